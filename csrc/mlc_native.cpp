// Native CPU kernel of the MLC loss: the fused forward + gradient of DESIGN.md section 2.
//
// One task per prompt (at::parallel_for): the Gram matrix of the m rows is accumulated in double
// (so its small eigenvalues are far above fp32's noise floor), the m x m eigenproblem is solved by
// cyclic Jacobi in double, and the gradient dR = B R is written in the input's dtype.
// Registered as torch.ops.mlc_native.mlc_fused(reps, mask, tau, objective, write_grad, sv_cutoff).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

constexpr double kNormEps = 1e-12;
constexpr int kMaxSweeps = 50;

// Eigen-decomposition of the symmetric n x n row-major matrix `a` (overwritten: eigenvalues end on
// its diagonal); `v` receives the eigenvectors as columns.
void jacobi_eigh(std::vector<double>& a, std::vector<double>& v, int n) {
  v.assign(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) v[i * n + i] = 1.0;
  const double eps2 = std::numeric_limits<double>::epsilon() * std::numeric_limits<double>::epsilon();
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    double off = 0.0, total = 0.0;
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        const double x = a[i * n + j] * a[i * n + j];
        total += x;
        if (i != j) off += x;
      }
    }
    if (!(off > eps2 * total)) break;
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = a[p * n + q];
        if (apq == 0.0) continue;
        const double diff = a[q * n + q] - a[p * n + p];
        const double sign = diff >= 0.0 ? 1.0 : -1.0;
        // tan of the angle that zeroes a_pq (Rutishauser's stable form)
        const double t = 2.0 * apq * sign / (std::abs(diff) + std::sqrt(diff * diff + 4.0 * apq * apq));
        const double c = 1.0 / std::sqrt(1.0 + t * t);
        const double s = t * c;
        for (int k = 0; k < n; ++k) {  // A <- A J
          const double akp = a[k * n + p], akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {  // A <- J^T A
          const double apk = a[p * n + k], aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
        for (int k = 0; k < n; ++k) {  // V <- V J
          const double vkp = v[k * n + p], vkq = v[k * n + q];
          v[k * n + p] = c * vkp - s * vkq;
          v[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
}

template <typename scalar_t>
double dot(const scalar_t* x, const scalar_t* y, int64_t d) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= d; k += 4) {
    for (int u = 0; u < 4; ++u) acc[u] += static_cast<double>(x[k + u]) * static_cast<double>(y[k + u]);
  }
  for (; k < d; ++k) acc[0] += static_cast<double>(x[k]) * static_cast<double>(y[k]);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Loss of one prompt and the m x m matrix B with dloss/dR = B R (B is left empty when not needed).
template <typename scalar_t>
double prompt_loss(const scalar_t* rows, const uint8_t* mask, int m, int64_t d, double inv_tau,
                   int objective, double sv_cutoff, bool want_grad, std::vector<double>& bmat) {
  std::vector<double> raw(m * m, 0.0), gram(m * m, 0.0), norms(m, 0.0), inv(m, 0.0);
  int count = 0;
  bool bad = false;
  for (int i = 0; i < m; ++i) {
    if (!mask[i]) continue;
    ++count;
    for (int j = i; j < m; ++j) {
      if (!mask[j]) continue;
      raw[i * m + j] = raw[j * m + i] = dot(rows + i * d, rows + j * d, d);
    }
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
  } else if (eligible && !bad) {
    // Masked rows: zero row and column, diagonal -1 (an eigenvalue that is dropped).
    std::vector<double> a(gram), vec;
    for (int i = 0; i < m; ++i)
      if (!mask[i]) a[i * m + i] = -1.0;
    jacobi_eigh(a, vec, m);
    std::vector<int> order;
    for (int i = 0; i < m; ++i)
      if (mask[i] && a[i * m + i] > -0.5) order.push_back(i);
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return a[x * m + x] > a[y * m + y]; });
    const int kept = static_cast<int>(std::min<int64_t>(order.size(), std::min<int64_t>(count, d)));
    std::vector<double> w(m, 0.0);
    const int top = order[0];
    if (objective == 0) {  // sv_softmax: -log softmax(s / tau)_1 over the min(m_n, d) singular values
      std::vector<double> sv(kept), ex(kept);
      for (int r = 0; r < kept; ++r) sv[r] = std::sqrt(std::max(a[order[r] * m + order[r]], 0.0));
      double denom = 0.0;
      for (int r = 0; r < kept; ++r) denom += (ex[r] = std::exp((sv[r] - sv[0]) * inv_tau));
      loss = std::log(denom);
      for (int r = 0; r < kept; ++r) {
        const double g = (ex[r] / denom - (r == 0 ? 1.0 : 0.0)) * inv_tau;
        w[order[r]] = sv[r] >= sv_cutoff ? g / sv[r] : 0.0;  // 2 dloss/dlambda; subgradient 0 below eps_s
      }
    } else {  // rank1: 1 - s_1^2 / m_n
      loss = 1.0 - std::max(a[top * m + top], 0.0) / count;
      w[top] = -2.0 / count;
    }
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j) {
        double acc = 0.0;
        for (int k = 0; k < m; ++k) acc += vec[i * m + k] * w[k] * vec[j * m + k];
        mmat[i * m + j] = acc;
      }
  }
  if (!eligible) {
    loss = 0.0;
    std::fill(mmat.begin(), mmat.end(), 0.0);
  }
  if (bad) loss = std::numeric_limits<double>::quiet_NaN();
  if (!want_grad) return loss;

  // dr_l = (dZ_l - z_l (dZ_l . z_l)) / |r_l| with dZ = M Z, as dR = B R; a zero row gets no gradient.
  bmat.assign(m * m, 0.0);
  for (int l = 0; l < m; ++l) {
    if (!mask[l]) continue;
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

std::tuple<at::Tensor, at::Tensor> mlc_fused_cpu(const at::Tensor& reps_in, const at::Tensor& mask_in, double tau,
                                                 int64_t objective, bool write_grad, double sv_cutoff) {
  TORCH_CHECK(reps_in.dim() == 3, "mlc_native.mlc_fused: reps must be (N, m, d), got ", reps_in.sizes());
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.size(0) == reps_in.size(0) && mask_in.size(1) == reps_in.size(1),
              "mlc_native.mlc_fused: mask must be (N, m)");
  const at::Tensor reps = reps_in.contiguous();
  const at::Tensor mask = mask_in.to(at::kByte).contiguous();
  const int64_t n = reps.size(0), d = reps.size(2);
  const int m = static_cast<int>(reps.size(1));
  const auto loss_dtype = reps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({n}, reps.options().dtype(loss_dtype));
  at::Tensor grad = write_grad ? at::empty_like(reps) : at::empty({0, m, d}, reps.options());
  const double inv_tau = 1.0 / tau;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, reps.scalar_type(), "mlc_fused_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* rp = reps.const_data_ptr<scalar_t>();
    const uint8_t* mp = mask.const_data_ptr<uint8_t>();
    scalar_t* gp = write_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    std::vector<double> losses(n);
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> bmat;
      std::vector<opmath_t> acc(d);
      for (const auto p : c10::irange(begin, end)) {
        const scalar_t* rows = rp + p * m * d;
        const uint8_t* pm = mp + p * m;
        losses[p] = prompt_loss(rows, pm, m, d, inv_tau, static_cast<int>(objective), sv_cutoff, write_grad, bmat);
        if (!write_grad) continue;
        for (int l = 0; l < m; ++l) {
          std::fill(acc.begin(), acc.end(), opmath_t(0));
          if (pm[l]) {
            for (int k = 0; k < m; ++k) {
              if (!pm[k]) continue;
              const opmath_t coef = static_cast<opmath_t>(bmat[l * m + k]);
              const scalar_t* xk = rows + k * d;
              for (int64_t j = 0; j < d; ++j) acc[j] += coef * static_cast<opmath_t>(xk[j]);
            }
          }
          scalar_t* out = gp + (p * m + l) * d;
          for (int64_t j = 0; j < d; ++j) out[j] = static_cast<scalar_t>(acc[j]);
        }
      }
    });
    if (loss_dtype == at::kDouble) {
      std::copy(losses.begin(), losses.end(), loss.mutable_data_ptr<double>());
    } else {
      std::transform(losses.begin(), losses.end(), loss.mutable_data_ptr<float>(),
                     [](double x) { return static_cast<float>(x); });
    }
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY(mlc_native, m) {
  m.def("mlc_fused(Tensor reps, Tensor mask, float tau, int objective, bool write_grad, float sv_cutoff)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mlc_native, CPU, m) { m.impl("mlc_fused", &mlc_fused_cpu); }
