"""The three-phase Triton kernels against a float64 oracle written from the objectives' definitions
(``mlc_kernels.ops.common.OBJECTIVES``): all seven objectives, with and without ``anchor``, masks,
m > d, zero rows, non-finite rows, fp32/bf16/fp16, determinism (interpreter on CPU, small shapes)."""

from __future__ import annotations

import pytest
import torch
from helpers import general_position, impl_device

from mlc_kernels.ops.common import NORM_EPS, OBJECTIVES
from mlc_kernels.ops.triton import triton_loss_and_grad, triton_mlc_loss

TAU = 0.7
KINKED = [("sv_softmax", 1.0), ("signed_sv_softmax", 1.0), ("relative_sv_softmax", 0.2)]
"""The objectives with a kink at collinearity (they deflate), each at its temperature."""


def _objective(z: torch.Tensor, tau: float, objective: str) -> torch.Tensor:
    """Loss of one prompt from its ``(c, d)`` unit rows (base row first), float64."""
    c = z.shape[0]
    cos = z @ z.T
    iu = torch.triu_indices(c, c, offset=1)
    if objective == "pairwise":
        return (1.0 - cos[iu[0], iu[1]] ** 2).mean()
    if objective == "signed_pairwise":
        return (1.0 - cos[iu[0], iu[1]]).mean()
    if objective == "anchor_cos":
        return (1.0 - z[1:] @ z[0].detach()).mean()
    s = torch.linalg.svdvals(z)  # min(c, d) values, descending
    if objective == "rank1":
        return 1.0 - s[0] ** 2 / c
    if objective == "sv_softmax":
        return -torch.log_softmax(s / tau, dim=-1)[0]
    if objective == "relative_sv_softmax":  # s / stopgrad(s_1 + eps)
        return -torch.log_softmax(s / (s[:1].detach() + 1e-12) / tau, dim=-1)[0]
    rho = z.sum(dim=0).norm() / c**0.5  # signed_sv_softmax
    logits = torch.cat([rho[None], s[1:]]) / tau
    return torch.logsumexp(logits, dim=0) - logits[0]


def _oracle(reps: torch.Tensor, present: torch.Tensor, objective: str, anchor: bool, tau: float = TAU):
    """Per-prompt losses ``(N,)`` and the gradient of their sum ``(N, m, d)``, float64, plain autograd.

    Rows are normalised as ``r / max(|r|, eps)``; zero rows and masked rows get zero gradient,
    the base row (first present variant) too when ``anchor``."""
    x = reps.detach().double().requires_grad_()
    losses = []
    for n in range(x.shape[0]):
        idx = present[n].nonzero().flatten()
        if idx.numel() < 2:
            losses.append(x[n].sum() * 0.0)
            continue
        rows = x[n, idx]
        z = rows / rows.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        losses.append(_objective(z, tau, objective))
    loss = torch.stack(losses)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    grad = torch.where(present[..., None] & (reps.double().norm(dim=-1, keepdim=True) > NORM_EPS), grad, 0.0)
    if anchor:
        base = present.float().argmax(dim=1)
        grad[torch.arange(x.shape[0]), base] = 0.0
    return loss.detach(), grad


def _inputs(n: int, m: int, d: int, seed: int, dtype=torch.float32):
    """General-position rows with some flipped in sign, a random mask (>= 2 present in prompt 0)."""
    reps = general_position(n, m, d, seed=seed)
    sign = torch.where(torch.rand(n, m, 1, generator=torch.Generator().manual_seed(seed)) < 0.3, -1.0, 1.0)
    reps = (reps * sign.double()).to(dtype)
    present = torch.rand(n, m, generator=torch.Generator().manual_seed(seed + 1)) >= 0.25
    present[0, :2] = True
    present[-1, 0] = False  # a prompt whose base row is not row 0
    return reps, present


def _run(reps, present, objective, anchor):
    dev = impl_device("triton")
    loss, grad = triton_loss_and_grad(reps.to(dev), present.to(dev), TAU, objective, anchor)
    return loss.double().cpu(), grad.double().cpu()


@pytest.mark.parametrize("anchor", [False, True])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fp32_matches_oracle(objective, anchor):
    reps, present = _inputs(3, 10, 40, seed=3)
    reps[1, 4] = 0.0  # a present zero vector
    present[1, 4] = True
    ref_loss, ref_grad = _oracle(reps, present, objective, anchor)
    loss, grad = _run(reps, present, objective, anchor)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert (grad - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()
    assert (grad[~present] == 0).all() and (grad[1, 4] == 0).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_m_greater_than_d(objective):
    reps, present = _inputs(2, 20, 6, seed=5)
    ref_loss, ref_grad = _oracle(reps, present, objective, anchor=True)
    loss, grad = _run(reps, present, objective, anchor=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert (grad - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_half_precision_magnitude(objective, dtype):
    reps, present = _inputs(3, 10, 64, seed=7, dtype=dtype)
    anchor = objective in ("signed_sv_softmax", "sv_softmax")
    ref_loss, ref_grad = _oracle(reps, present, objective, anchor)  # the oracle sees the 16-bit values
    loss, grad = _run(reps, present, objective, anchor)
    assert ((loss - ref_loss).abs() <= 1e-5 * ref_loss.abs() + 1e-6).all()
    eps = torch.finfo(dtype).eps
    # elementwise: as exact as rounding the exact gradient to the 16-bit output (an absolute floor
    # for fp16's subnormals); in norm: within the rounding of the output
    assert ((grad - ref_grad).abs() <= eps * ref_grad.abs() + 1e-2 * eps * ref_grad.abs().max()).all()
    assert (grad - ref_grad).norm() <= 0.6 * eps * ref_grad.norm()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_non_finite_row_gives_nan_loss_and_gradient(objective):
    reps, present = _inputs(3, 6, 16, seed=9)
    present[1] = True
    reps[1, 3, 5] = float("nan") if objective.startswith("s") else float("inf")
    reps[2, 1] = float("nan")
    present[2, 1] = False  # masked: never read
    loss, grad = _run(reps, present, objective, anchor=True)
    clean = torch.where(torch.isfinite(reps), reps, 0.0)  # prompts 0 and 2 as the kernel sees them
    ref_loss, ref_grad = _oracle(clean, present, objective, anchor=True)
    assert torch.isnan(loss[1]) and not torch.isfinite(grad[1, 3]).any()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()
    torch.testing.assert_close(loss[[0, 2]], ref_loss[[0, 2]], rtol=1e-5, atol=1e-6)
    assert (grad[[0, 2]] - ref_grad[[0, 2]]).abs().max() <= 1e-4 * ref_grad[[0, 2]].abs().max()


def test_bitwise_deterministic_and_autograd_scaling():
    reps, present = _inputs(4, 10, 40, seed=11)
    weights = torch.tensor([0.5, -2.0, 3.0, 1.0])
    dev = impl_device("triton")
    grads = []
    for _ in range(2):
        x = reps.clone().to(dev).requires_grad_()
        loss = triton_mlc_loss(x, present.to(dev), TAU, "signed_sv_softmax", anchor=True)
        (loss * weights.to(dev)).sum().backward()
        grads.append((loss.detach().cpu(), x.grad.cpu()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    ref_loss, ref_grad = _oracle(reps, present, "signed_sv_softmax", anchor=True)
    ref_w = _oracle(reps, present, "signed_sv_softmax", anchor=True)[1] * weights.double()[:, None, None]
    torch.testing.assert_close(grads[0][0].double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert (grads[0][1].double() - ref_w).abs().max() <= 1e-4 * ref_w.abs().max()
    assert ref_grad.abs().max() > 0


def test_loss_only_call_writes_no_backward_matrix():
    reps, present = _inputs(2, 5, 16, seed=12)
    dev = impl_device("triton")
    with torch.no_grad():
        mask = present.to(dev).to(torch.uint8)
        loss, bmat = torch.ops.mlc_kernels.mlc_forward(reps.to(dev), mask, TAU, 0, False, False)
    assert bmat.shape[0] == 0 and loss.shape == (2,)


def test_shipped_tuned_entry_is_used_and_compiled(monkeypatch):
    from mlc_kernels.ops.triton import TUNED, KernelConfig, all_kernel_configs, kernel_config

    entry = {"m_pad": 16, "gram_block_d": 64, "small_warps": 2, "grad_blocks": 8}
    monkeypatch.setitem(TUNED, "sm_90/bfloat16/16", entry)
    cfg = kernel_config(10, torch.bfloat16, 90)
    assert cfg == KernelConfig(**entry)
    assert kernel_config(10, torch.bfloat16, 80) != cfg  # only for its own arch
    assert (90, torch.bfloat16, cfg) in all_kernel_configs()


@pytest.mark.parametrize(("objective", "tau"), KINKED)
@pytest.mark.parametrize(("m", "d"), [(20, 64), (6, 4)])  # M_PAD 32; m > d
def test_deflation_with_masks(objective, tau, m, d):
    """Near collinearity (delta 1e-4) the kernel deflates like ``gram_torch._deflate`` with masked rows (holding
    NaN, never read) and M_PAD 32: its fp32 gradient meets the converged contract's bound against the float64
    reference (tests/test_converged.py). m > d is ill-conditioned there (a kept singular value near 0; the
    torch impl misses the bound as well): finite, the loss of the torch impl. Bitwise deterministic."""
    from helpers import loss_and_grad, near_collinear

    reps = near_collinear(3, m, d, 1e-4, seed=4).float()
    present = torch.ones(3, m, dtype=torch.bool)
    present[0, 1] = present[1, m - 1] = present[2, 0] = present[2, 2] = False
    clean = torch.where(present[..., None], reps, 0.0)
    reps[~present] = float("nan")
    dev = impl_device("triton")
    loss, got = triton_loss_and_grad(reps.to(dev), present.to(dev), tau, objective)
    again = triton_loss_and_grad(reps.to(dev), present.to(dev), tau, objective)
    assert torch.equal(loss, again[0]) and torch.equal(got, again[1])
    got = got.double().cpu()
    assert torch.isfinite(got).all() and (got[~present] == 0).all()
    torch_loss, _ = loss_and_grad(clean, present, "torch", objective=objective, tau=tau)
    torch.testing.assert_close(loss.double().cpu(), torch_loss, rtol=1e-5, atol=1e-5)
    if m <= d:
        _, ref = loss_and_grad(clean.double(), present, "reference", objective=objective, tau=tau)
        err = (got - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
        assert float(err.max()) <= 16 * 6e-8 / 1e-4, err.tolist()  # the converged contract's fp32 bound
