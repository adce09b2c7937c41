"""Property tests (hypothesis) of the fast impls against the float64 reference."""

from __future__ import annotations

import torch
from helpers import loss_and_grad, near_collinear, oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@st.composite
def problems(draw, max_m: int = 12, max_d: int = 24):
    n = draw(st.integers(1, 4))
    m = draw(st.integers(1, max_m))
    d = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["random", "near_collinear"]))
    if kind == "random":
        reps = torch.randn(n, m, d, generator=gen, dtype=torch.float64) * (torch.rand(n, m, 1, generator=gen) + 0.2)
    else:
        reps = near_collinear(n, m, d, draw(st.sampled_from([1e-5, 1e-3, 1e-1])), seed=seed)
    mask = torch.rand(n, m, generator=gen) > draw(st.sampled_from([0.0, 0.3]))
    objective = draw(st.sampled_from(["sv_softmax", "rank1", "pairwise", "relative_sv_softmax"]))
    tau = draw(st.sampled_from([0.1, 1.0, 3.0]))
    return reps, mask, objective, tau, kind


def _well_conditioned(reps64: torch.Tensor, mask: torch.Tensor, floor: float = 0.05) -> bool:
    """General position: every kept singular value of every prompt's unit rows is >= floor.

    Gradients through a singular value near the cut-off eps_s (or below it) are not held to the
    general-position tolerance: the cut-off zeroes them on purpose (see README).
    """
    for rows, present in zip(reps64, mask, strict=True):
        if int(present.sum()) >= 2:
            z = torch.nn.functional.normalize(rows[present], dim=-1)
            if torch.linalg.svdvals(z).min() < floor:
                return False
    return True


def _check(reps64, mask, objective, tau, kind, impl, dtype):
    reps = reps64.to(dtype)
    ref_loss, ref_grad = oracle(reps, mask, objective=objective, tau=tau)
    loss, grad = loss_and_grad(reps, mask, impl, objective=objective, tau=tau)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    if dtype == torch.float64:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-7)
    else:
        # fp32: the converged regime's absolute bound, else the general-position relative one
        tol = 2e-4 if kind == "near_collinear" else 1e-5 * ref_loss.abs().max().item() + 1e-6
        assert (loss - ref_loss).abs().max() <= tol
    if kind == "random" and _well_conditioned(reps64, mask):
        # floor for gradients that are 0 (d = 1): rounding noise, on the scale 1/|r| of the gradient
        rel, floor = (1e-7, 1e-12) if dtype == torch.float64 else (1e-4, 1e-6)
        scale = (1.0 / reps64.norm(dim=-1)[mask]).max().item() if mask.any() else 0.0
        assert (grad - ref_grad).abs().max() <= rel * ref_grad.abs().max() + floor * scale


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_torch_and_native_impls_match_reference(problem):
    reps, mask, objective, tau, kind = problem
    for impl in ("torch", "native"):
        _check(reps, mask, objective, tau, kind, impl, torch.float64)
        _check(reps, mask, objective, tau, kind, impl, torch.float32)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_m=10, max_d=16))
def test_triton_impl_matches_reference(problem):
    reps, mask, objective, tau, kind = problem
    _check(reps, mask, objective, tau, kind, "triton", torch.float32)
