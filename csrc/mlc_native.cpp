// Native CPU kernel of the MLC loss: the fused forward + gradient dZ = M Z (objectives in ops/common.py).
//
// The two streaming products go to BLAS through ATen: the Gram matrices R R^T in double (batched,
// chunked so the double copy stays small; the small eigenvalues are then far above fp32's noise
// floor) and the gradient dR = B R. In between, one task per prompt (at::parallel_for) solves the
// m x m eigenproblem in double (Householder + implicit QL) and builds the loss and B.
// Registered as torch.ops.mlc_native.mlc_fused(reps, mask, tau, objective, anchor, write_grad, sv_cutoff);
// anchor: stop-gradient on each prompt's base row (its first present variant), the loss unchanged.
// torch.ops.mlc_native.mlc_reduced(reps, mask?, tau, objective, anchor, sv_cutoff, reduction) is the same kernel
// with the reduction (1 sum, 2 mean over the prompts with >= 2 present variants) and its autograd formula in C++:
// the mean's 1/count is folded into B, the backward is one in-place scale (no Python on the autograd path).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

constexpr double kNormEps = 1e-12;
constexpr double kRelativeSvEps = 1e-12;  // relative_sv_softmax: s / stopgrad(s_1 + eps)
constexpr int kMaxSweeps = 50;

// Eigen-decomposition of the symmetric n x n row-major matrix `a`: Householder reduction to
// tridiagonal form, then the implicit QL method (EISPACK tred2 / tql2, as in JAMA). O(n^3) with a
// small constant: several times cheaper than Jacobi sweeps at these sizes. On return `lam` holds
// the eigenvalues (unsorted) and the columns of `v` (row-major n x n) the eigenvectors.
void symmetric_eigh(const std::vector<double>& a, int n, std::vector<double>& lam, std::vector<double>& v) {
  v = a;
  lam.assign(n, 0.0);
  std::vector<double> e(n, 0.0);
  auto V = [&](int i, int j) -> double& { return v[static_cast<size_t>(i) * n + j]; };
  std::vector<double>& d = lam;
  for (int j = 0; j < n; ++j) d[j] = V(n - 1, j);
  for (int i = n - 1; i > 0; --i) {  // tred2: Householder reduction
    double scale = 0.0, h = 0.0;
    for (int k = 0; k < i; ++k) scale += std::abs(d[k]);
    if (scale == 0.0) {
      e[i] = d[i - 1];
      for (int j = 0; j < i; ++j) {
        d[j] = V(i - 1, j);
        V(i, j) = 0.0;
        V(j, i) = 0.0;
      }
    } else {
      for (int k = 0; k < i; ++k) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      double f = d[i - 1];
      double g = std::sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (int j = 0; j < i; ++j) e[j] = 0.0;
      for (int j = 0; j < i; ++j) {
        f = d[j];
        V(j, i) = f;
        g = e[j] + V(j, j) * f;
        for (int k = j + 1; k <= i - 1; ++k) {
          g += V(k, j) * d[k];
          e[k] += V(k, j) * f;
        }
        e[j] = g;
      }
      f = 0.0;
      for (int j = 0; j < i; ++j) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const double hh = f / (h + h);
      for (int j = 0; j < i; ++j) e[j] -= hh * d[j];
      for (int j = 0; j < i; ++j) {
        f = d[j];
        g = e[j];
        for (int k = j; k <= i - 1; ++k) V(k, j) -= (f * e[k] + g * d[k]);
        d[j] = V(i - 1, j);
        V(i, j) = 0.0;
      }
    }
    d[i] = h;
  }
  for (int i = 0; i < n - 1; ++i) {  // accumulate the transformations
    V(n - 1, i) = V(i, i);
    V(i, i) = 1.0;
    const double h = d[i + 1];
    if (h != 0.0) {
      for (int k = 0; k <= i; ++k) d[k] = V(k, i + 1) / h;
      for (int j = 0; j <= i; ++j) {
        double g = 0.0;
        for (int k = 0; k <= i; ++k) g += V(k, i + 1) * V(k, j);
        for (int k = 0; k <= i; ++k) V(k, j) -= g * d[k];
      }
    }
    for (int k = 0; k <= i; ++k) V(k, i + 1) = 0.0;
  }
  for (int j = 0; j < n; ++j) {
    d[j] = V(n - 1, j);
    V(n - 1, j) = 0.0;
  }
  V(n - 1, n - 1) = 1.0;
  e[0] = 0.0;

  for (int i = 1; i < n; ++i) e[i - 1] = e[i];  // tql2: implicit QL on the tridiagonal matrix
  e[n - 1] = 0.0;
  double f = 0.0, tst1 = 0.0;
  const double eps = std::numeric_limits<double>::epsilon();
  for (int l = 0; l < n; ++l) {
    tst1 = std::max(tst1, std::abs(d[l]) + std::abs(e[l]));
    int m = l;
    while (m < n) {
      if (std::abs(e[m]) <= eps * tst1) break;
      ++m;
    }
    if (m > l) {
      for (int iter = 0; iter < kMaxSweeps; ++iter) {
        double g = d[l];
        double p = (d[l + 1] - g) / (2.0 * e[l]);
        double r = std::hypot(p, 1.0);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const double dl1 = d[l + 1];
        double h = g - d[l];
        for (int i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        double c = 1.0, c2 = 1.0, c3 = 1.0, s = 0.0, s2 = 0.0;
        const double el1 = e[l + 1];
        for (int i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = std::hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          for (int k = 0; k < n; ++k) {
            h = V(k, i + 1);
            V(k, i + 1) = s * V(k, i) + c * h;
            V(k, i) = c * V(k, i) - s * h;
          }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
        if (!(std::abs(e[l]) > eps * tst1)) break;
      }
    }
    d[l] += f;
    e[l] = 0.0;
  }
}

// `raw`: the prompt's m x m Gram matrix R R^T (masked rows zeroed); `bmat` (m x m) receives B.
double prompt_loss(const double* raw, const bool* mask, int m, int64_t d, double inv_tau, int objective,
                   bool anchor, double sv_cutoff, double* bmat) {
  std::vector<double> gram(m * m, 0.0), norms(m, 0.0), inv(m, 0.0);
  int count = 0, base = -1;
  bool bad = false;
  for (int i = 0; i < m; ++i) {
    if (!mask[i]) continue;
    if (base < 0) base = i;  // the base row b: the first present variant
    ++count;
    if (!std::isfinite(raw[i * m + i])) bad = true;
  }
  for (int i = 0; i < m; ++i) {
    norms[i] = std::sqrt(raw[i * m + i]);
    inv[i] = 1.0 / std::max(norms[i], kNormEps);
  }
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j)
      if (mask[i] && mask[j]) gram[i * m + j] = raw[i * m + j] * inv[i] * inv[j];

  std::vector<double> mmat(m * m, 0.0);
  double loss = 0.0;
  const bool eligible = count >= 2;
  if (objective == 2) {  // pairwise: mean over pairs of (1 - G_ij^2)
    const double n_pairs = std::max(0.5 * count * (count - 1), 1.0);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j)
        if (i != j && mask[i] && mask[j]) {
          loss += 0.5 * (1.0 - gram[i * m + j] * gram[i * m + j]) / n_pairs;
          mmat[i * m + j] = -2.0 * gram[i * m + j] / n_pairs;
        }
  } else if (objective == 3) {  // signed_pairwise: mean over pairs of (1 - G_ij)
    const double n_pairs = std::max(0.5 * count * (count - 1), 1.0);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j)
        if (i != j && mask[i] && mask[j]) {
          loss += 0.5 * (1.0 - gram[i * m + j]) / n_pairs;
          mmat[i * m + j] = -1.0 / n_pairs;
        }
  } else if (objective == 4) {  // anchor_cos: mean over j != b of 1 - G_jb; M_jb = -1 / (c - 1)
    const double denom = std::max(count - 1, 1);
    for (int j = 0; j < m; ++j)
      if (mask[j] && j != base) {
        loss += (1.0 - gram[j * m + base]) / denom;
        mmat[j * m + base] = -1.0 / denom;
      }
  } else if (eligible && !bad) {
    // Masked rows: zero row and column, diagonal -1 (an eigenvalue that is dropped).
    std::vector<double> a(gram), lam, vec;
    for (int i = 0; i < m; ++i)
      if (!mask[i]) a[i * m + i] = -1.0;
    symmetric_eigh(a, m, lam, vec);
    std::vector<int> order;
    for (int i = 0; i < m; ++i)
      if (lam[i] > -0.5) order.push_back(i);
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return lam[x] > lam[y]; });
    const int kept = static_cast<int>(std::min<int64_t>(order.size(), std::min<int64_t>(count, d)));
    std::vector<double> w(m, 0.0);
    double rho_coef = 0.0;
    const int top = order[0];
    if (objective == 0 || objective == 6) {  // sv_softmax: -log softmax(s / tau)_1 over the min(m_n, d) values
      std::vector<double> sv(kept), ex(kept);
      for (int r = 0; r < kept; ++r) sv[r] = std::sqrt(std::max(lam[order[r]], 0.0));
      // relative_sv_softmax: logits s / (sigma tau) with sigma = s_1 + eps held constant
      const double scale = objective == 6 ? inv_tau / (sv[0] + kRelativeSvEps) : inv_tau;
      double denom = 0.0;
      for (int r = 0; r < kept; ++r) denom += (ex[r] = std::exp((sv[r] - sv[0]) * scale));
      loss = std::log(denom);
      for (int r = 0; r < kept; ++r) {
        const double g = (ex[r] / denom - (r == 0 ? 1.0 : 0.0)) * scale;
        w[order[r]] = sv[r] >= sv_cutoff ? g / sv[r] : 0.0;  // 2 dloss/dlambda; subgradient 0 below eps_s
      }
    } else if (objective == 5) {  // signed_sv_softmax: logits (rho, s_2, ..., s_k) / tau
      double total = 0.0;
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < m; ++j)
          if (mask[i] && mask[j]) total += gram[i * m + j];
      const double rho = std::sqrt(std::max(total, 0.0) / count);  // |sum_j z_j| / sqrt(c)
      std::vector<double> lg(kept), ex(kept);
      lg[0] = rho;
      for (int r = 1; r < kept; ++r) lg[r] = std::sqrt(std::max(lam[order[r]], 0.0));
      const double top_logit = *std::max_element(lg.begin(), lg.end());  // rho may be below s_2
      double denom = 0.0;
      for (int r = 0; r < kept; ++r) denom += (ex[r] = std::exp((lg[r] - top_logit) * inv_tau));
      loss = std::log(denom) + (top_logit - rho) * inv_tau;
      for (int r = 1; r < kept; ++r) {
        const double g = ex[r] / denom * inv_tau;
        w[order[r]] = lg[r] >= sv_cutoff ? g / lg[r] : 0.0;
      }
      rho_coef = rho >= sv_cutoff ? (ex[0] / denom - 1.0) * inv_tau / (count * rho) : 0.0;
    } else {  // rank1: 1 - s_1^2 / m_n
      loss = 1.0 - std::max(lam[top], 0.0) / count;
      w[top] = -2.0 / count;
    }
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j) {
        double acc = 0.0;
        for (int k = 0; k < m; ++k) acc += vec[i * m + k] * w[k] * vec[j * m + k];
        if (mask[i] && mask[j]) acc += rho_coef;  // signed_sv_softmax: (g_rho / (c rho)) 1 1^T
        mmat[i * m + j] = acc;
      }
  }
  if (!eligible) {
    loss = 0.0;
    std::fill(mmat.begin(), mmat.end(), 0.0);
  }
  if (bad) loss = std::numeric_limits<double>::quiet_NaN();
  if (bmat == nullptr) return loss;

  // dr_l = (dZ_l - z_l (dZ_l . z_l)) / |r_l| with dZ = M Z, as dR = B R; a zero row gets no gradient.
  std::fill(bmat, bmat + m * m, 0.0);
  for (int l = 0; l < m; ++l) {
    if (!mask[l] || (anchor && l == base)) continue;  // anchor: the base row's gradient stays 0
    const bool nonzero = norms[l] > kNormEps;
    double proj = 0.0;
    if (nonzero)
      for (int k = 0; k < m; ++k) proj += mmat[l * m + k] * gram[k * m + l];
    for (int k = 0; k < m; ++k) {
      if (!mask[k]) continue;
      const double core = mmat[l * m + k] - (k == l ? proj : 0.0);
      bmat[l * m + k] = bad ? std::numeric_limits<double>::quiet_NaN() : (nonzero ? inv[l] : 0.0) * core * inv[k];
    }
  }
  return loss;
}

// The kernel: per-prompt losses (in `losses`, double) and, if write_grad, the gradient of sum_p grad_scale * loss_p
// (grad_scale folded into B before the product). mask: (N, m) bool, or undefined for "every variant present".
at::Tensor fused_impl(const at::Tensor& reps_in, const at::Tensor& mask_in, double tau, int64_t objective,
                      bool anchor, bool write_grad, double sv_cutoff, double grad_scale, std::vector<double>& losses,
                      const char* name) {
  TORCH_CHECK(reps_in.dim() == 3, name, ": reps must be (N, m, d), got ", reps_in.sizes());
  TORCH_CHECK(!mask_in.defined() || (mask_in.dim() == 2 && mask_in.size(0) == reps_in.size(0) &&
                                     mask_in.size(1) == reps_in.size(1)),
              name, ": mask must be (N, m)");
  TORCH_CHECK(at::isFloatingType(reps_in.scalar_type()), name, ": reps must be floating point");
  const at::Tensor reps = reps_in.contiguous();
  const int64_t n = reps.size(0), d = reps.size(2);
  const int m = static_cast<int>(reps.size(1));
  const bool is_double = reps.scalar_type() == at::kDouble;
  losses.assign(n, 0.0);
  if (n == 0) return at::empty({0, m, d}, reps.options());
  const at::Tensor mask = mask_in.defined() ? mask_in.to(at::kBool).contiguous() : at::Tensor();

  // Masked rows may hold anything (NaN included): they are zeroed before any product.
  const bool all_present = !mask.defined() || mask.all().item<bool>();
  const at::Tensor rows = all_present ? reps : reps.masked_fill(mask.logical_not().unsqueeze(-1), 0);
  std::vector<char> ones;
  if (!mask.defined()) ones.assign(static_cast<size_t>(n * m), 1);

  // Gram matrices in double, in chunks of about 4M elements so the double copy stays small.
  at::Tensor raw = at::empty({n, m, m}, reps.options().dtype(at::kDouble));
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, int64_t{m} * d));
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t stop = std::min(n, start + chunk);
    const at::Tensor x = rows.slice(0, start, stop).to(at::kDouble);
    at::Tensor out = raw.slice(0, start, stop);
    at::bmm_out(out, x, x.transpose(1, 2));
  }

  at::Tensor bmat = write_grad ? at::empty({n, m, m}, raw.options()) : at::Tensor();
  const double* raw_p = raw.const_data_ptr<double>();
  const bool* mask_p = mask.defined() ? mask.const_data_ptr<bool>() : reinterpret_cast<const bool*>(ones.data());
  double* bmat_p = write_grad ? bmat.mutable_data_ptr<double>() : nullptr;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (const auto p : c10::irange(begin, end)) {
      losses[p] = prompt_loss(raw_p + p * m * m, mask_p + p * m, m, d, 1.0 / tau, static_cast<int>(objective),
                              anchor, sv_cutoff, write_grad ? bmat_p + p * m * m : nullptr);
      if (write_grad && grad_scale != 1.0) {
        for (int k = 0; k < m * m; ++k) bmat_p[p * m * m + k] *= grad_scale;
      }
    }
  });
  if (!write_grad) return at::empty({0, m, d}, reps.options());

  // dR = B R through BLAS: in the input's dtype for fp32/fp64, in fp32 (then rounded) for 16-bit.
  at::Tensor grad = at::empty_like(reps);
  if (reps.scalar_type() == at::kFloat || is_double) {
    at::bmm_out(grad, bmat.to(reps.scalar_type()), rows);
  } else {
    const at::Tensor b32 = bmat.to(at::kFloat);
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t stop = std::min(n, start + chunk);
      grad.slice(0, start, stop).copy_(at::bmm(b32.slice(0, start, stop), rows.slice(0, start, stop).to(at::kFloat)));
    }
  }
  return grad;
}

at::Tensor losses_tensor(const std::vector<double>& losses, const at::Tensor& reps) {
  const bool is_double = reps.scalar_type() == at::kDouble;
  at::Tensor loss = at::empty({static_cast<int64_t>(losses.size())},
                              reps.options().dtype(is_double ? at::kDouble : at::kFloat));
  if (is_double) {
    std::copy(losses.begin(), losses.end(), loss.mutable_data_ptr<double>());
  } else {
    std::transform(losses.begin(), losses.end(), loss.mutable_data_ptr<float>(),
                   [](double x) { return static_cast<float>(x); });
  }
  return loss;
}

std::tuple<at::Tensor, at::Tensor> mlc_fused_cpu(const at::Tensor& reps, const c10::optional<at::Tensor>& mask,
                                                 double tau, int64_t objective, bool anchor, bool write_grad,
                                                 double sv_cutoff) {
  std::vector<double> losses;
  at::Tensor grad = fused_impl(reps, mask.has_value() ? *mask : at::Tensor(), tau, objective, anchor, write_grad,
                               sv_cutoff, 1.0, losses, "mlc_native.mlc_fused");
  return {losses_tensor(losses, reps), grad};
}

// The reduction's denominator: prompts with >= 2 present variants, at least 1 (as checks.eligible_count).
int64_t eligible_count(const at::Tensor& mask, int64_t n, int64_t m) {
  if (!mask.defined()) return std::max<int64_t>(1, m >= 2 ? n : 0);
  const at::Tensor present = mask.to(at::kBool).contiguous();
  const bool* p = present.const_data_ptr<bool>();
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += std::count(p + i * m, p + (i + 1) * m, true) >= 2;
  return std::max<int64_t>(1, count);
}

constexpr int64_t kSum = 1, kMean = 2;

// The reduced loss (0-dim, fp32; fp64 for fp64 reps) and, if write_grad, its gradient (the mean's 1/count folded
// into B); the gradient is (0, m, d) otherwise.
std::tuple<at::Tensor, at::Tensor> mlc_reduced_forward_cpu(const at::Tensor& reps, const c10::optional<at::Tensor>& mask,
                                                           double tau, int64_t objective, bool anchor, double sv_cutoff,
                                                           int64_t reduction, bool write_grad) {
  TORCH_CHECK(reduction == kSum || reduction == kMean, "mlc_native.mlc_reduced: reduction must be 1 (sum) or 2 (mean)");
  const at::Tensor mask_t = mask.has_value() ? *mask : at::Tensor();
  TORCH_CHECK(reps.dim() == 3, "mlc_native.mlc_reduced: reps must be (N, m, d), got ", reps.sizes());
  const double count =
      reduction == kMean ? static_cast<double>(eligible_count(mask_t, reps.size(0), reps.size(1))) : 1.0;
  std::vector<double> losses;
  at::Tensor grad = fused_impl(reps, mask_t, tau, objective, anchor, write_grad, sv_cutoff, 1.0 / count, losses,
                               "mlc_native.mlc_reduced");
  const double total = std::accumulate(losses.begin(), losses.end(), 0.0) / count;
  const auto dtype = reps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {at::scalar_tensor(total, reps.options().dtype(dtype)), grad};
}

std::tuple<at::Tensor, at::Tensor> call_reduced_forward(const at::Tensor& reps, const c10::optional<at::Tensor>& mask,
                                                        double tau, int64_t objective, bool anchor, double sv_cutoff,
                                                        int64_t reduction, bool write_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlc_native::mlc_reduced_forward", "")
                             .typed<decltype(mlc_reduced_forward_cpu)>();
  return op.call(reps, mask, tau, objective, anchor, sv_cutoff, reduction, write_grad);
}

// forward: mlc_reduced_forward below the autograd key (one op as the dispatcher sees it), the gradient saved.
// backward: that gradient times the incoming scalar, in place (the saved tensor's version check refuses a second
// backward through the same graph); refuses double backward (create_graph) rather than return a constant.
class MLCReduced : public torch::autograd::Function<MLCReduced> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& reps,
                            const c10::optional<at::Tensor>& mask, double tau, int64_t objective, bool anchor,
                            double sv_cutoff, int64_t reduction, bool write_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] = call_reduced_forward(reps, mask, tau, objective, anchor, sv_cutoff, reduction, write_grad);
    if (write_grad) ctx->save_for_backward({grad});
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mlc_loss(impl='native'): double backward (create_graph=True) is not supported; use impl='torch'");
    const auto saved = ctx->get_saved_variables();
    TORCH_CHECK(!saved.empty(), "mlc_loss(impl='native'): the forward ran without gradient; cannot backpropagate");
    at::Tensor grad = saved[0];
    const at::Tensor& upstream = grad_outputs[0];
    if (upstream.defined()) {
      grad.mul_(upstream.scalar_type() == grad.scalar_type() ? upstream : upstream.to(grad.scalar_type()));
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor mlc_reduced_autograd(const at::Tensor& reps, const c10::optional<at::Tensor>& mask, double tau,
                                int64_t objective, bool anchor, double sv_cutoff, int64_t reduction) {
  const bool write_grad = at::GradMode::is_enabled() && reps.requires_grad();
  return MLCReduced::apply(reps, mask, tau, objective, anchor, sv_cutoff, reduction, write_grad);
}

// The reduced loss without autograd (inference tensors, or called below the autograd key).
at::Tensor mlc_reduced_cpu(const at::Tensor& reps, const c10::optional<at::Tensor>& mask, double tau,
                           int64_t objective, bool anchor, double sv_cutoff, int64_t reduction) {
  return std::get<0>(mlc_reduced_forward_cpu(reps, mask, tau, objective, anchor, sv_cutoff, reduction, false));
}

}  // namespace

TORCH_LIBRARY(mlc_native, m) {
  m.def("mlc_fused(Tensor reps, Tensor? mask, float tau, int objective, bool anchor, bool write_grad, float sv_cutoff)"
        " -> (Tensor, Tensor)");
  m.def("mlc_reduced(Tensor reps, Tensor? mask, float tau, int objective, bool anchor, float sv_cutoff, "
        "int reduction) -> Tensor");
  m.def("mlc_reduced_forward(Tensor reps, Tensor? mask, float tau, int objective, bool anchor, float sv_cutoff, "
        "int reduction, bool write_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mlc_native, CPU, m) {
  m.impl("mlc_fused", &mlc_fused_cpu);
  m.impl("mlc_reduced", &mlc_reduced_cpu);
  m.impl("mlc_reduced_forward", &mlc_reduced_forward_cpu);
}

TORCH_LIBRARY_IMPL(mlc_native, Autograd, m) { m.impl("mlc_reduced", &mlc_reduced_autograd); }
