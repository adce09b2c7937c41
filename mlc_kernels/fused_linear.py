"""The extractor fused with the loss: ``mlc_loss(hidden @ weight.T + bias)`` processed in chunks of prompts.

In the manner of Liger's fused linear cross-entropy: for each chunk of prompts the forward runs the
GEMM (torch: cuBLAS / MKL), the fused loss-and-gradient kernel of the chosen impl, and the two
gradient GEMMs, so the ``(N, m, d)`` representations, their normalised copies and the eigen-factors
are never alive for more than one chunk. For ``reduction="mean"``/``"sum"`` the backward only scales
the gradients computed in the forward; for ``"none"`` it recomputes each chunk with the per-prompt
weights of ``grad_output``.

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

DEFAULT_CHUNK_ROWS = 1024
"""Default chunk, in rows (prompts x variants) per GEMM: the chunk's representations and their gradient
stay a few MB. On CPU this costs no time (1.01x, N=1024, m=10). On CUDA each launch of the fused Triton
kernel has a latency floor of 0.2-0.6 ms (one program per prompt runs the eigensolver serially), so
small chunks cost time: on an H200, 1024-row chunks gave 0.34x the memory at 3.3x the time of the
unfused path, one 10240-row chunk 1.08x the memory at 1.13x the time (benchmarks/results/nvidia-h200).
Pass ``chunk_size`` to trade memory for time."""

CUDA_CHUNK_BYTES = 512 * 2**20
"""On CUDA the default chunk is sized from memory instead: as many rows as keep the chunk's
representations and their gradient (``2 * rows * d * itemsize`` bytes) within this budget, and never
fewer than ``DEFAULT_CHUNK_ROWS`` (fewer, larger launches; the Triton kernels are bandwidth-bound)."""


def default_chunk_prompts(m: int, d: int, dtype: torch.dtype, device: torch.device) -> int:
    """Prompts per chunk when ``chunk_size`` is not given: ``DEFAULT_CHUNK_ROWS // m`` on CPU; on CUDA
    from ``CUDA_CHUNK_BYTES`` for ``d`` output features of ``dtype``."""
    rows = DEFAULT_CHUNK_ROWS
    if device.type == "cuda":
        rows = max(rows, CUDA_CHUNK_BYTES // max(1, 2 * d * torch.finfo(dtype).bits // 8))
    return max(1, rows // m)


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
    def forward(ctx, hidden, weight, bias, present, tau, objective, reduction, impl, chunk, cdtype, anchor=False):
        n, m, dh = hidden.shape
        d = weight.shape[0]
        loss_and_grad = per_prompt_loss_and_grad(impl)
        needs = ctx.needs_input_grad[:3]
        precompute = any(needs) and reduction != "none"
        w = weight.to(cdtype)
        b = bias.to(cdtype) if bias is not None else None
        loss_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
        losses = torch.empty(n, dtype=loss_dtype, device=hidden.device)
        count = eligible_count(present)
        scale = (1.0 / count.to(loss_dtype)) if reduction == "mean" else torch.ones((), device=hidden.device)
        ws = _Workspace(hidden, weight, bias, min(chunk, n), cdtype)
        grads = _Grads(hidden, weight, bias, needs, ws) if precompute else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                rows, reps = ws.project(hidden, start, stop, w, b)
                if precompute:
                    loss, grad_reps = loss_and_grad(reps, present[start:stop], tau, objective, anchor)
                    del reps
                    grads.add(start, stop, rows, grad_reps.mul_(scale.to(grad_reps.dtype)).view(-1, d), w)
                    del grad_reps  # freed before the next chunk's kernel allocates its own
                else:
                    with torch.no_grad():
                        loss = per_prompt_loss(impl)(reps, present[start:stop], tau, objective, anchor)
                losses[start:stop] = loss
        ctx.save_for_backward(hidden, weight, bias, present)
        ctx.grads = grads.finish() if precompute else None
        ctx.options = (tau, objective, reduction, impl, chunk, cdtype, anchor)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / count.to(total.dtype) if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, present = ctx.saved_tensors
        tau, objective, reduction, impl, chunk, cdtype, anchor = ctx.options
        if ctx.grads is not None:  # computed in the forward: scale in place (first backward only)
            grad_hidden, grad_weight, grad_bias = ctx.grads
            ctx.grads = None
            for g in (grad_hidden, grad_weight, grad_bias):
                if g is not None:
                    g.mul_(grad_out.to(g.dtype))
        else:  # reduction="none", or a second backward of the same graph: recompute with per-prompt weights
            needs = ctx.needs_input_grad[:3]
            n, m, dh = hidden.shape
            ws = _Workspace(hidden, weight, bias, min(chunk, n), cdtype)
            grads = _Grads(hidden, weight, bias, needs, ws)
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
                    grads.add(start, stop, rows, grad_reps.mul_(weights).view(-1, d), w)
                    del grad_reps
            grad_hidden, grad_weight, grad_bias = grads.finish()
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


class _Workspace:
    """One chunk's buffers, allocated once per pass and reused by every chunk (the last, shorter chunk
    uses a prefix): the representations, the inputs cast to the compute dtype when a cast is needed,
    and the temporaries of the gradient GEMMs whose output dtype differs from the accumulator's.

    Chunk-sized tensors freed and reallocated every chunk stay in the heap under glibc's default
    allocator (and in the CUDA caching allocator); one set of buffers keeps the extra memory at one chunk.
    """

    def __init__(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prompts: int, cdtype: torch.dtype
    ) -> None:
        m, dh = hidden.shape[1], hidden.shape[2]
        d = weight.shape[0]
        rows = prompts * m
        kw = {"dtype": cdtype, "device": hidden.device}
        self.m, self.dh, self.d = m, dh, d
        self.reps = torch.empty(rows, d, **kw)
        self.rows = torch.empty(rows, dh, **kw) if hidden.dtype != cdtype else None
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.grad_hidden = torch.empty(rows, dh, **kw) if hidden.dtype != cdtype else None
        self.grad_weight = torch.empty(d, dh, **kw) if cdtype != acc else None
        self.grad_bias = torch.empty(d, **kw) if bias is not None else None

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
    """Accumulates the three gradients chunk by chunk (weight and bias in fp32 or fp64), through the
    workspace's buffers where a dtype conversion is needed."""

    def __init__(self, hidden, weight, bias, needs, ws: _Workspace):
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.bias = (
            torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None and needs[2] else None
        )
        self._dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        self._m = hidden.shape[1]
        self._ws = ws

    def add(self, start: int, stop: int, rows: torch.Tensor, grad_rows: torch.Tensor, w: torch.Tensor) -> None:
        """``rows``: the chunk's inputs ``(c*m, d_h)``; ``grad_rows``: dloss/dreps ``(c*m, d)``.

        The GEMMs write into the gradient buffers directly where the dtypes allow, else into the
        workspace (no chunk-sized temporaries are allocated per chunk).
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
        if self.weight is not None:
            if self.weight.dtype == rows.dtype:
                self.weight.addmm_(grad_rows.T, rows)
            else:
                self.weight += torch.mm(grad_rows.T, rows, out=ws.grad_weight)
        if self.bias is not None:
            self.bias += torch.sum(grad_rows, dim=0, out=ws.grad_bias)

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
        chunk_size: prompts per chunk (default ``default_chunk_prompts``: about 1024 rows on CPU, a
            memory budget of ``CUDA_CHUNK_BYTES`` on CUDA). Extra memory
            is bounded by the chunk, not by N.
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
    probe = hidden.new_empty((0, m, weight.shape[0]), dtype=cdtype)
    name = resolve_impl(impl, probe)
    chunk = chunk_size or default_chunk_prompts(m, weight.shape[0], cdtype, hidden.device)
    present = mask if mask is not None else torch.ones(n, m, dtype=torch.bool, device=hidden.device)
    if spec is None:  # the plain loss, exactly as without guards
        return _FusedLinearMLC.apply(
            hidden, weight, bias, present, float(tau), objective, reduction, name, chunk, cdtype
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
        cdtype, spec.anchor,
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
        guard: str | None = None,
        uniform_weight: float = DEFAULT_UNIFORM_WEIGHT,
        uniform_t: float = DEFAULT_UNIFORM_T,
        whiten_shrinkage: float | None = None,
    ) -> None:
        super().__init__()
        self.options = {"tau": tau, "objective": objective, "reduction": reduction, "impl": impl}
        self.options["chunk_size"] = chunk_size
        if guard is not None:  # the repr of the unguarded module stays as it was
            parse_guard(guard)
            self.options.update(
                guard=guard, uniform_weight=uniform_weight, uniform_t=uniform_t, whiten_shrinkage=whiten_shrinkage
            )

    def forward(self, hidden, weight, bias=None, mask=None) -> torch.Tensor:
        return fused_linear_mlc_loss(hidden, weight, bias, mask, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
