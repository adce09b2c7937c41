"""The extractor fused with the loss: ``mlc_loss(hidden @ weight.T + bias)`` processed in chunks of prompts.

In the manner of Liger's fused linear cross-entropy: for each chunk of prompts the forward runs the
GEMM (torch: cuBLAS / MKL), the fused loss-and-gradient kernel of the chosen impl, and the two
gradient GEMMs, so the ``(N, m, d)`` representations, their normalised copies and the eigen-factors
are never alive for more than one chunk. The gradients are written in place into the buffers handed back
(the input gradient into its chunk's slice, weight and bias gradients summed chunk by chunk, as Liger's
``accum_dtype``): nothing the size of the weight is allocated besides them. For ``reduction="mean"``/``"sum"``
the backward only scales the gradients computed in the forward; for ``"none"`` it recomputes each chunk with the
per-prompt weights of ``grad_output``.

Mixed dtypes follow torch's autocast conventions: under ``torch.autocast`` the GEMMs run in the
autocast dtype (hidden, weight and bias are cast, as ``nn.Linear`` does) and the loss kernel sees the
representations in that dtype; each gradient comes back in its input's own dtype. Outside autocast,
hidden, weight and bias must share one dtype, as ``F.linear`` requires.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_mask, check_options, eligible_count
from .guards import DEFAULT_UNIFORM_T, DEFAULT_UNIFORM_WEIGHT, check_guard_options, parse_guard
from .loss import mlc_loss, reduce_with_guard
from .ops import FLOAT_DTYPES, per_prompt_loss, per_prompt_loss_and_grad, resolve_impl

DEFAULT_CHUNKS = 16
"""Default number of chunks off CUDA: the prompts are split into this many chunks (fewer when a chunk would fall
below ``MIN_CHUNK_ROWS``), so the chunk's buffers are a small fraction of the unfused path's representations at
every N (a byte budget ends in one chunk at small N and saves nothing). On CPU the GEMMs run as fast on 640-row
chunks as on the whole batch (benchmarks/results/cpu-epyc-2core/fused_linear_v3/NOTE.md); below about 128 rows
the weight is packed once per chunk and the chunks start to cost time."""

CUDA_DEFAULT_CHUNKS = 4
"""Default number of chunks on CUDA: each launch of the fused Triton kernel has a latency floor of 0.2-0.6 ms
(one program per prompt runs the eigensolver serially), so fewer, larger chunks; the caching allocator reuses
the chunk's blocks, so four chunks keep about a quarter of the unfused path's buffers (not measured here: no GPU
in the session that set it)."""

MIN_CHUNK_ROWS = 128
"""The floor of the default chunk, in rows (prompts x variants)."""


def default_chunk_prompts(n: int, m: int, device: torch.device) -> int:
    """Prompts per chunk when ``chunk_size`` is not given: ``ceil(n / chunks)`` with ``CUDA_DEFAULT_CHUNKS`` chunks
    on CUDA and ``DEFAULT_CHUNKS`` elsewhere, at least ``ceil(MIN_CHUNK_ROWS / m)`` prompts, at most n."""
    chunks = CUDA_DEFAULT_CHUNKS if device.type == "cuda" else DEFAULT_CHUNKS
    per_chunk = -(-n // chunks)
    floor = -(-MIN_CHUNK_ROWS // m)
    return max(1, min(n, max(per_chunk, floor)))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        got = f"hidden {hidden.dtype}, weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise TypeError(
            f"fused_linear_mlc_loss: hidden, weight and bias must share a dtype outside torch.autocast "
            f"(as F.linear requires), got {got}; cast them or run under torch.autocast"
        )
    return hidden.dtype


def _accum_dtype(accum_dtype: torch.dtype | None, weight: torch.Tensor) -> torch.dtype:
    """The gradient accumulators' dtype: ``accum_dtype`` or the weight's; never narrower than the weight's."""
    if accum_dtype is None:
        return weight.dtype
    if (
        accum_dtype not in FLOAT_DTYPES
        or torch.finfo(accum_dtype).bits < torch.finfo(weight.dtype).bits
        or (accum_dtype != weight.dtype and torch.finfo(accum_dtype).bits == torch.finfo(weight.dtype).bits)
    ):
        raise TypeError(
            f"accum_dtype must be None, the weight's dtype ({weight.dtype}) or a wider float dtype "
            f"(torch.float32, torch.float64), got {accum_dtype!r}"
        )
    return accum_dtype


def _check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} must be on the device of hidden ({hidden.device}), got {t.device}")
    if hidden.dim() != 3 or hidden.shape[1] < 1:
        raise ValueError(f"hidden must have shape (N, m, d_h) with m >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2] or weight.shape[0] < 1:
        raise ValueError(
            f"weight must have shape (d, d_h) = (d, {hidden.shape[2]}) to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape (d,) = ({weight.shape[0]},), got {tuple(bias.shape)}")


class _FusedLinearMLC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, present, tau, objective, reduction, impl, chunk, cdtype, acc, anchor=False):
        n = hidden.shape[0]
        d = weight.shape[0]
        loss_and_grad = per_prompt_loss_and_grad(impl)
        needs = ctx.needs_input_grad[:3]
        precompute = any(needs) and reduction != "none"
        w = weight.to(cdtype)
        b = bias.to(cdtype) if bias is not None else None
        loss_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
        losses = torch.empty(n, dtype=loss_dtype, device=hidden.device)
        count = eligible_count(present)
        scale = (1.0 / count.to(loss_dtype)).to(cdtype) if reduction == "mean" else None
        ws = _Workspace(hidden, weight, min(chunk, n), cdtype, acc)
        grads = _Grads(hidden, weight, bias, needs, ws, acc) if precompute else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                rows, reps = ws.project(hidden, start, stop, w, b)
                if precompute:
                    loss, grad_reps = loss_and_grad(reps, present[start:stop], tau, objective, anchor)
                    del reps
                    if scale is not None:
                        grad_reps.mul_(scale)
                    grads.add(hidden, start, stop, rows, grad_reps.view(-1, d), w)
                    del grad_reps  # freed before the next chunk's kernel allocates its own
                else:
                    with torch.no_grad():
                        loss = per_prompt_loss(impl)(reps, present[start:stop], tau, objective, anchor)
                losses[start:stop] = loss
        ctx.save_for_backward(hidden, weight, bias, present)
        ctx.grads = grads.finish() if precompute else None
        ctx.options = (tau, objective, reduction, impl, chunk, cdtype, acc, anchor)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / count.to(total.dtype) if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, present = ctx.saved_tensors
        tau, objective, reduction, impl, chunk, cdtype, acc, anchor = ctx.options
        if ctx.grads is not None:  # computed in the forward: scale in place (first backward only)
            grad_hidden, grad_weight, grad_bias = ctx.grads
            ctx.grads = None
            for g in (grad_hidden, grad_weight, grad_bias):
                if g is not None:
                    g.mul_(grad_out.to(g.dtype))
        else:  # reduction="none", or a second backward of the same graph: recompute with per-prompt weights
            needs = ctx.needs_input_grad[:3]
            n = hidden.shape[0]
            ws = _Workspace(hidden, weight, min(chunk, n), cdtype, acc)
            grads = _Grads(hidden, weight, bias, needs, ws, acc)
            if reduction != "none":
                grad_out = grad_out.expand(n)
                if reduction == "mean":
                    grad_out = grad_out / eligible_count(present).to(grad_out.dtype)
            d = weight.shape[0]
            w = weight.to(cdtype)
            b = bias.to(cdtype) if bias is not None else None
            loss_and_grad = per_prompt_loss_and_grad(impl)
            with torch.autocast(hidden.device.type, enabled=False):
                for start in range(0, n, chunk):
                    stop = min(start + chunk, n)
                    rows, reps = ws.project(hidden, start, stop, w, b)
                    _, grad_reps = loss_and_grad(reps, present[start:stop], tau, objective, anchor)
                    del reps
                    weights = grad_out[start:stop].to(grad_reps.dtype)[:, None, None]
                    grads.add(hidden, start, stop, rows, grad_reps.mul_(weights).view(-1, d), w)
                    del grad_reps
            grad_hidden, grad_weight, grad_bias = grads.finish()
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def _addmm_out_dtype_supported(device: torch.device) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32)`` runs on this device: CUDA from sm80 (as Liger checks;
    no CPU kernel in torch 2.13)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


class _Workspace:
    """One chunk's buffers, allocated once per pass and reused by every chunk (the last, shorter chunk
    uses a prefix), all chunk-sized (nothing the size of the weight): the representations ``(c*m, d)``, the inputs
    cast to the compute dtype and the input gradient in the compute dtype when hidden is in another dtype, and the
    chunk's operands cast to the accumulator's dtype when the weight gradient accumulates in another dtype than the
    GEMMs run in (no out-dtype GEMM on this device).

    Chunk-sized tensors freed and reallocated every chunk stay in the heap under glibc's default
    allocator (and in the CUDA caching allocator); one set of buffers keeps the extra memory at one chunk.
    """

    def __init__(
        self, hidden: torch.Tensor, weight: torch.Tensor, prompts: int, cdtype: torch.dtype, acc: torch.dtype
    ) -> None:
        m, dh = hidden.shape[1], hidden.shape[2]
        d = weight.shape[0]
        rows = prompts * m
        kw = {"dtype": cdtype, "device": hidden.device}
        self.m, self.dh, self.d = m, dh, d
        self.reps = torch.empty(rows, d, **kw)
        self.rows = torch.empty(rows, dh, **kw) if hidden.dtype != cdtype else None
        self.grad_hidden = torch.empty(rows, dh, **kw) if hidden.dtype != cdtype else None
        cast = acc != cdtype and not (acc == torch.float32 and _addmm_out_dtype_supported(hidden.device))
        self.grad_rows_acc = torch.empty(rows, d, dtype=acc, device=hidden.device) if cast else None
        self.rows_acc = torch.empty(rows, dh, dtype=acc, device=hidden.device) if cast and hidden.dtype != acc else None

    def project(
        self, hidden: torch.Tensor, start: int, stop: int, w: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's inputs ``(c*m, d_h)`` in the compute dtype and its representations ``(c, m, d)``,
        written into the workspace (``rows @ w.T + b``, as ``F.linear`` computes it)."""
        r = (stop - start) * self.m
        rows = hidden[start:stop].reshape(-1, self.dh)
        if self.rows is not None:
            rows = self.rows[:r].copy_(rows)
        elif not rows.is_contiguous():
            rows = rows.contiguous()
        out = self.reps[:r]
        if b is not None:
            torch.addmm(b, rows, w.t(), out=out)
        else:
            torch.mm(rows, w.t(), out=out)
        return rows, out.view(stop - start, self.m, self.d)


class _Grads:
    """The three gradients, accumulated chunk by chunk in place in the buffers handed back: the input gradient
    written into the chunk's slice of one ``(N, m, d_h)`` buffer, weight and bias gradients summed into buffers of
    dtype ``acc`` (the weight's own dtype unless ``accum_dtype`` asked for another; then one cast at the end)."""

    def __init__(self, hidden, weight, bias, needs, ws: _Workspace, acc: torch.dtype):
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.bias = (
            torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None and needs[2] else None
        )
        self._dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        self._ws = ws

    def add(
        self, hidden: torch.Tensor, start: int, stop: int, rows: torch.Tensor, grad_rows: torch.Tensor, w: torch.Tensor
    ) -> None:
        """``rows``: the chunk's inputs ``(c*m, d_h)`` in the compute dtype; ``grad_rows``: dloss/dreps ``(c*m, d)``.

        The GEMMs write into the gradient buffers directly where the dtypes allow, else through the workspace's
        chunk-sized buffers (nothing is allocated per chunk, nothing weight-sized at all).
        """
        ws = self._ws
        grad_rows = grad_rows.to(rows.dtype)
        r = grad_rows.shape[0]
        if self.hidden is not None:
            target = self.hidden[start:stop].view(-1, self.hidden.shape[2])
            if target.dtype == grad_rows.dtype:
                torch.mm(grad_rows, w, out=target)
            else:
                target.copy_(torch.mm(grad_rows, w, out=ws.grad_hidden[:r]))
        acc = self.weight.dtype if self.weight is not None else None
        if self.weight is not None and acc == rows.dtype:
            self.weight.addmm_(grad_rows.T, rows)
        elif self.weight is not None and ws.grad_rows_acc is None:  # fp32 accumulator, half GEMM (CUDA)
            torch.addmm(self.weight, grad_rows.T, rows, out_dtype=acc, out=self.weight)
        elif self.weight is not None:  # the chunk's operands in the accumulator's dtype (chunk-sized casts)
            g = ws.grad_rows_acc[:r].copy_(grad_rows)
            x = hidden[start:stop].reshape(-1, ws.dh) if ws.rows_acc is None else ws.rows_acc[:r].copy_(rows)
            self.weight.addmm_(g.T, x)
        if self.bias is not None:
            self.bias.add_(grad_rows.sum(dim=0, dtype=self.bias.dtype))

    def finish(self):
        weight = self.weight.to(self._dtypes[0]) if self.weight is not None else None
        bias = self.bias.to(self._dtypes[1]) if self.bias is not None else None
        return self.hidden, weight, bias


def fused_linear_mlc_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    tau: float = 0.2,
    objective: str = "relative_sv_softmax",
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    guard: str | None = None,
    uniform_weight: float = DEFAULT_UNIFORM_WEIGHT,
    uniform_t: float = DEFAULT_UNIFORM_T,
    whiten_shrinkage: float | None = None,
) -> torch.Tensor:
    """MLC loss of ``hidden @ weight.T + bias`` without keeping the representations for backward.

    Args:
        hidden: ``(N, m, d_h)`` hidden states (fp32/bf16/fp16/fp64): N prompts, m variants.
        weight: ``(d, d_h)`` extractor weight; bias: optional ``(d,)``.
        mask: optional ``(N, m)`` bool, True where the variant is present.
        tau, objective, reduction, impl: as :func:`mlc_kernels.mlc_loss`, with its defaults (the authors'
            ``relative_sv_softmax`` at ``tau=0.2``; ``"sv_softmax"`` is the paper text's formula). ``impl`` picks
            the loss kernel; the GEMMs always go to torch.
        chunk_size: prompts per chunk (default ``default_chunk_prompts``: N split into ``DEFAULT_CHUNKS`` chunks,
            ``CUDA_DEFAULT_CHUNKS`` on CUDA, of at least ``MIN_CHUNK_ROWS`` rows). Extra memory is bounded by the
            chunk, not by N.
        accum_dtype: dtype of the weight- and bias-gradient accumulators (default: the weight's own dtype, as
            Liger's fused linear cross-entropy). The gradients are summed in place into the buffers handed back;
            ``torch.float32`` (or ``float64``) with bf16/fp16 parameters adds one weight-sized accumulator and a cast
            at the end. Under autocast with fp32 parameters the GEMMs run in the autocast dtype and accumulate into
            fp32 (an out-dtype GEMM on CUDA, chunk-sized casts elsewhere).
        guard, uniform_weight, uniform_t, whiten_shrinkage: as :func:`mlc_kernels.mlc_loss`. ``center`` stays
            fused and exact: the mean of the representations is ``mean(h) W^T + b``, so the fused loss runs on
            the centred hidden states without bias (the gradient reaches ``hidden`` through the centring; the
            bias gets a zero gradient). ``anchor`` passes through to the kernel. ``whiten`` materialises the
            ``(N, m, d)`` representations (it needs their covariance) and runs the unfused
            :func:`mlc_kernels.mlc_loss`; ``uniform`` materialises them for its own term only.

    Returns:
        The loss as ``mlc_loss(hidden @ weight.T + bias, mask, ...)`` returns it, with gradients for
        hidden, weight and bias.
    """
    _check_linear_inputs(hidden, weight, bias)
    n, m, _ = hidden.shape
    check_mask(mask, n, m, hidden.device)
    check_options(tau, objective, reduction)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    spec = parse_guard(guard)
    check_guard_options(spec, reduction, uniform_weight, uniform_t, whiten_shrinkage)
    cdtype = _compute_dtype(hidden, weight, bias)
    acc = _accum_dtype(accum_dtype, weight)
    probe = hidden.new_empty((0, m, weight.shape[0]), dtype=cdtype)
    name = resolve_impl(impl, probe)
    chunk = chunk_size or default_chunk_prompts(n, m, hidden.device)
    present = mask if mask is not None else torch.ones(n, m, dtype=torch.bool, device=hidden.device)
    if spec is None:  # the plain loss, exactly as without guards
        return _FusedLinearMLC.apply(
            hidden, weight, bias, present, float(tau), objective, reduction, name, chunk, cdtype, acc
        )
    # keeps the bias in the graph with a zero gradient (engines expect a gradient for every parameter)
    touch = 0.0 * bias.sum() if bias is not None and bias.requires_grad else None
    if spec.whiten:
        reps = F.linear(hidden, weight, bias)
        options = {"uniform_weight": uniform_weight, "uniform_t": uniform_t, "whiten_shrinkage": whiten_shrinkage}
        return mlc_loss(reps, mask, tau=tau, objective=objective, reduction=reduction, impl=impl, guard=str(spec),
                        **options)  # fmt: skip
    if spec.center:
        # mean(h W^T + b) over the present rows = mean(h) W^T + b: centre h (differentiably) and drop the bias
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        x = torch.where(present[..., None], hidden.to(acc), 0.0)
        mu = x.sum(dim=(0, 1)) / present.sum().clamp_min(1).to(acc)
        hidden = torch.where(present[..., None], x - mu, 0.0).to(hidden.dtype)
        bias = None
    per_prompt = _FusedLinearMLC.apply(
        hidden, weight, bias, present, float(tau), objective, "none" if spec.uniform else reduction, name, chunk,
        cdtype, acc, spec.anchor,
    )  # fmt: skip
    if spec.uniform:
        reps = F.linear(hidden, weight, bias)
        out = reduce_with_guard(per_prompt, present, reduction, spec, reps, uniform_weight, uniform_t)
    else:
        out = per_prompt
    return out + touch if touch is not None else out


class FusedLinearMLCLoss(nn.Module):
    """Module form of :func:`fused_linear_mlc_loss`: ``forward(hidden, weight, bias=None, mask=None)``; options as
    keywords, with its defaults (``relative_sv_softmax``, ``tau=0.2``)."""

    def __init__(
        self,
        *,
        tau: float = 0.2,
        objective: str = "relative_sv_softmax",
        reduction: str = "mean",
        impl: str = "auto",
        chunk_size: int | None = None,
        accum_dtype: torch.dtype | None = None,
        guard: str | None = None,
        uniform_weight: float = DEFAULT_UNIFORM_WEIGHT,
        uniform_t: float = DEFAULT_UNIFORM_T,
        whiten_shrinkage: float | None = None,
    ) -> None:
        super().__init__()
        self.options = {"tau": tau, "objective": objective, "reduction": reduction, "impl": impl}
        self.options["chunk_size"] = chunk_size
        if accum_dtype is not None:  # the repr without it stays as it was
            self.options["accum_dtype"] = accum_dtype
        if guard is not None:  # the repr of the unguarded module stays as it was
            parse_guard(guard)
            self.options.update(
                guard=guard, uniform_weight=uniform_weight, uniform_t=uniform_t, whiten_shrinkage=whiten_shrinkage
            )

    def forward(self, hidden, weight, bias=None, mask=None) -> torch.Tensor:
        return fused_linear_mlc_loss(hidden, weight, bias, mask, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
