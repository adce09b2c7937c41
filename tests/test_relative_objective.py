"""The authors' objective ``relative_sv_softmax``, the default of the loss API, against an independent float64
transcription of their released ``_compute_aux_loss`` (written here from its formula, never calling the package):
every impl's values and gradients with and without masks, tau, the stop-gradient on s_1, the converged regime,
the non-deflated Gram route's singular-value cut-off, the defaults of every entry point, and torch.compile."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import general_position, impl_device, near_collinear, random_mask
from test_converged import ROUNDOFF, contract_bound

from mlc_kernels import FusedLinearMLCLoss, MLCHead, MLCLoss, fused_linear_mlc_loss, mlc_loss
from mlc_kernels.ops import per_prompt_loss_and_grad
from mlc_kernels.ops.common import DEFLATION_RATIO, singular_value_cutoff

IMPLS = ["reference", "torch", "native", "triton"]


def authors_aux_loss(
    reps: torch.Tensor, present: torch.Tensor, tau: float = 0.2, stop_gradient: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt losses ``(N,)`` (0 for prompts with < 2 present rows) and their mean over the other prompts.

    Per prompt, on its present rows only: ``z_l = r_l / (|r_l| + 1e-12)``, ``s = svd(Z).S``,
    ``logits = (s / stopgrad(s_1 + 1e-12)) / tau``, ``cross_entropy(logits, 0)``. ``stop_gradient=False``:
    the same without the ``detach`` (a different gradient, the same values)."""
    losses = []
    for rows_all, keep in zip(reps, present, strict=True):
        rows = rows_all[keep]
        if rows.shape[0] < 2:
            losses.append(rows.sum() * 0.0)
            continue
        z = rows / (rows.norm(dim=-1, keepdim=True) + 1e-12)
        s = torch.linalg.svd(z).S
        lead = s[:1].detach() if stop_gradient else s[:1]
        logits = (s / (lead + 1e-12)) / tau
        losses.append(F.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long)))
    per_prompt = torch.stack(losses)
    eligible = (present.sum(dim=1) >= 2).sum().clamp_min(1)
    return per_prompt, per_prompt.sum() / eligible


def transcription(reps: torch.Tensor, mask=None, tau: float = 0.2, stop_gradient: bool = True):
    """``(per-prompt losses, mean, d mean / d reps)`` of :func:`authors_aux_loss` in float64 on the values of reps."""
    x = reps.detach().double().requires_grad_()
    present = mask if mask is not None else torch.ones(reps.shape[:2], dtype=torch.bool)
    per_prompt, mean = authors_aux_loss(x, present, tau, stop_gradient)
    (grad,) = torch.autograd.grad(mean, x)
    return per_prompt.detach(), mean.detach(), grad


def default_loss(reps: torch.Tensor, mask, impl: str, **options):
    """``mlc_loss(reps, mask, impl=impl, **options)`` with its defaults: ``(per-prompt losses, mean, d mean / d reps)``
    in float64 on CPU."""
    dev = impl_device(impl)
    x = reps.detach().clone().to(dev).requires_grad_()
    m = None if mask is None else mask.to(dev)
    mean = mlc_loss(x, m, impl=impl, **options)
    mean.backward()
    with torch.no_grad():
        per_prompt = mlc_loss(x, m, impl=impl, reduction="none", **options)
    return per_prompt.double().cpu(), mean.detach().double().cpu(), x.grad.double().cpu()


def _dtypes(impl: str) -> list[torch.dtype]:
    return [torch.float32] if impl == "triton" else [torch.float32, torch.float64]


def _assert_matches(got, ref, dtype: torch.dtype) -> None:
    """Values to 1e-4 relative and gradients to 1e-3 of their largest entry (fp32); 1e-8 for fp64 input."""
    rel_value, rel_grad = (1e-4, 1e-3) if dtype != torch.float64 else (1e-8, 1e-8)
    torch.testing.assert_close(got[0], ref[0], rtol=rel_value, atol=1e-7)
    torch.testing.assert_close(got[1], ref[1], rtol=rel_value, atol=0)
    err = (got[2] - ref[2]).abs().max()
    assert err <= rel_grad * ref[2].abs().max(), f"gradient off by {float(err / ref[2].abs().max()):.2e}"


# (n, m, d): m = 10 with d = 512, odd sizes, m = 2, m > d (min(m, d) = 6 singular values)
SHAPES = [(3, 10, 512), (3, 7, 33), (3, 2, 16), (3, 10, 6)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
def test_default_loss_is_the_authors_aux_loss(impl, shape, masked):
    n, m, d = shape
    reps64 = general_position(n, m, d, seed=m + d)
    mask = None
    if masked:  # prompt 0 complete, prompt 1 with missing variants, prompt 2 a single variant (out of the mean)
        mask = random_mask(n, m, seed=d, p_missing=0.4)
        mask[0] = True
        mask[1, :2] = True
        mask[1, -1] = m < 3
        mask[2] = False
        mask[2, 1] = True
    for dtype in _dtypes(impl):
        reps = reps64.to(dtype)
        ref = transcription(reps, mask)
        dirty = reps.clone()
        if mask is not None:
            dirty[~mask] = float("nan")  # masked rows are never read
        got = default_loss(dirty, mask, impl)
        _assert_matches(got, ref, dtype)
        if mask is not None:
            assert got[0][2] == 0 and (got[2][~mask] == 0).all()
            # the prompt with missing variants: the transcription of its present rows alone
            alone = transcription(reps[1:2, mask[1]])
            torch.testing.assert_close(got[0][1:2], alone[0], rtol=1e-4 if dtype != torch.float64 else 1e-8, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_stop_gradient_on_s1(impl):
    """The gradient is the detached transcription's, not the gradient through s_1 in the denominator (the values
    are the same): the two differ by far more than the tolerance."""
    reps = general_position(3, 6, 32, seed=4).float()
    ref = transcription(reps)
    through = transcription(reps, stop_gradient=False)
    torch.testing.assert_close(through[0], ref[0], rtol=1e-12, atol=0)
    scale = ref[2].abs().max()
    assert (through[2] - ref[2]).abs().max() > 0.1 * scale  # the premise: the stop-gradient matters here
    got = default_loss(reps, None, impl)
    _assert_matches(got, ref, torch.float32)
    assert (got[2] - through[2]).abs().max() > 0.1 * scale


@pytest.mark.parametrize("impl", IMPLS)
def test_tau_is_used(impl):
    reps = general_position(3, 8, 24, seed=6).float()
    mask = random_mask(3, 8, seed=2)
    results = {}
    for tau in (0.2, 0.5):
        ref = transcription(reps, mask, tau=tau)
        got = default_loss(reps, mask, impl, tau=tau)
        _assert_matches(got, ref, torch.float32)
        results[tau] = got
    assert (results[0.2][0] - results[0.5][0]).abs().min() > 1e-2 * results[0.5][0].abs().max()
    assert (results[0.2][2] - results[0.5][2]).abs().max() > 1e-2 * results[0.5][2].abs().max()
    assert default_loss(reps, mask, impl)[1] == results[0.2][1]  # the default tau is 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("delta", [1e-3, 1e-5])
@pytest.mark.parametrize("impl", ["torch", "native", "triton"])
def test_converged_regime(impl, delta, dtype):
    """Near collinearity (deflated prompts in torch and triton): the loss to the converged regime's 2e-4 (fp32),
    the gradient within the converged contract's bound (tests/test_converged.py) against the transcription, plus
    the transcription's own float64 rounding (its SVD knows s_j ~ delta to about eps64 / delta: the float64
    reference impl differs from it by up to 25 eps64 / delta)."""
    if dtype == torch.float64 and impl == "triton":
        pytest.skip("triton takes fp32/bf16/fp16")
    reps = near_collinear(4, 10, 64, delta, seed=7).to(dtype)
    per_ref, _, grad_ref = transcription(reps)
    per_prompt, _, grad = default_loss(reps, None, impl)
    assert (per_prompt - per_ref).abs().max() <= (2e-4 if dtype == torch.float32 else 1e-9)
    err = (grad - grad_ref).flatten(1).norm(dim=1) / grad_ref.flatten(1).norm(dim=1)
    assert (reps.shape[0] * grad_ref).flatten(1).norm(dim=1).min() > 1e-3  # the kink: each prompt's gradient stays
    bound = contract_bound(impl, dtype, delta, reps.shape[1]) + 32 * ROUNDOFF[torch.float64] / delta
    assert float(err.max()) <= bound, f"rel err {err.tolist()} > {bound:.2e}"


def low_rank_prompts(n: int, m: int, d: int, s_min: float, seed: int = 0) -> torch.Tensor:
    """``(n, m, d)`` float64 prompts of m - 1 random rows and one row close to their span: the unit rows' smallest
    singular value is ``s_min`` (to 1e-5 relative), the others O(1) (far from collinear: no deflation)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = torch.randn(m - 1, d, generator=gen, dtype=torch.float64)
        inside = torch.randn(m - 1, generator=gen, dtype=torch.float64) @ rows
        basis, _ = torch.linalg.qr(rows.T)
        away = torch.randn(d, generator=gen, dtype=torch.float64)
        away = away - basis @ (basis.T @ away)
        away = away / away.norm()
        step = 1e-2
        for _ in range(4):  # the smallest singular value is about linear in the step: rescale to hit s_min
            prompt = torch.cat([rows, (inside + step * away)[None]])
            step *= s_min / float(torch.linalg.svdvals(F.normalize(prompt, dim=-1))[-1])
        out.append(torch.cat([rows, (inside + step * away)[None]]))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("options", "tol"), [({}, 1e-3), ({"objective": "sv_softmax", "tau": 1.0}, 1e-2)], ids=["default", "sv_softmax"]
)
@pytest.mark.parametrize("impl", ["torch", "native", "triton"])
def test_small_real_singular_value_keeps_its_gradient(impl, options, tol):
    """A prompt far from collinear (not deflated) with a small but real singular value, 3x the fp32 cut-off
    ``eps_s``: it is above the Gram matrix's noise floor and its term ``g_j / s_j`` is part of the gradient
    (about 1% of it at the default tau, 10% at tau 1). A cut-off 10x too high drops it."""
    m, d = 5, 64
    cutoff = singular_value_cutoff(d, m, torch.float32)
    reps = low_rank_prompts(4, m, d, 3 * cutoff, seed=1).float()
    s = torch.linalg.svdvals(F.normalize(reps.double(), dim=-1))
    assert bool(((s[:, -1] > 2 * cutoff) & (s[:, -1] < 4 * cutoff)).all())  # the premise: between 1x and 10x
    assert bool((s[:, 1] ** 2 >= 10 * DEFLATION_RATIO * s[:, 0] ** 2).all())  # far from deflation
    kw = {"objective": "relative_sv_softmax", "tau": 0.2, **options}
    present = torch.ones(4, m, dtype=torch.bool)
    _, ref = per_prompt_loss_and_grad("reference")(reps.double(), present, kw["tau"], kw["objective"])
    dev = impl_device(impl)
    _, got = per_prompt_loss_and_grad(impl)(reps.to(dev), present.to(dev), kw["tau"], kw["objective"])
    err = (got.double().cpu() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert float(err.max()) <= tol, f"{impl}: rel err {err.tolist()}"


def test_defaults_of_every_entry_point():
    for fn in (mlc_loss, fused_linear_mlc_loss, MLCLoss.__init__, FusedLinearMLCLoss.__init__):
        params = inspect.signature(fn).parameters
        assert params["objective"].default == "relative_sv_softmax" and params["tau"].default == 0.2, fn
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 6, 12, generator=gen, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 2:4] = False
    head = MLCHead(12, 8, dtype=torch.float64)
    reps = F.linear(hidden, head.weight, head.bias)
    _, ref, _ = transcription(reps, mask)
    for impl in ("torch", "native"):
        for value in (
            MLCLoss(impl=impl)(reps, mask),
            fused_linear_mlc_loss(hidden, head.weight, head.bias, mask, impl=impl, chunk_size=3),
            FusedLinearMLCLoss(impl=impl)(hidden, head.weight, head.bias, mask),
            head.loss(hidden, mask, impl=impl),
            head(hidden, mask, loss=True, impl=impl),
        ):
            torch.testing.assert_close(value.detach(), ref, rtol=1e-9, atol=0)
    # the gradient through the head: the transcription's, by autograd through F.linear
    x = hidden.clone().requires_grad_()
    authors_aux_loss(F.linear(x, head.weight, head.bias), mask)[1].backward()
    y = hidden.clone().requires_grad_()
    head.loss(y, mask, impl="native").backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "torch", "native"])
def test_default_under_torch_compile(impl):
    """The compiled default (the reference's dense form, the torch impl's traced branch, the native custom op)
    equals the transcription."""
    torch._dynamo.reset()
    reps = general_position(3, 5, 8, seed=5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    compiled = torch.compile(lambda x, k: mlc_loss(x, k, impl=impl), fullgraph=True, backend="aot_eager")
    x = reps.clone().requires_grad_()
    out = compiled(x, mask)
    out.backward()
    _, ref, grad = transcription(reps, mask)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(x.grad, grad, rtol=1e-7, atol=1e-10)
