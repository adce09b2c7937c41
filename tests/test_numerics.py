"""Numerics of every implementation against the float64 reference (issue 2's tolerances)."""

from __future__ import annotations

import pytest
import torch
from helpers import general_position, impl_device, loss_and_grad, near_collinear, oracle, random_mask, run

from mlc_kernels import mlc_loss

FAST_IMPLS = ["torch", "native", "triton"]
OBJECTIVES = ["sv_softmax", "rank1", "pairwise", "relative_sv_softmax"]
# the default objective (the authors' relative_sv_softmax at tau 0.2) and the paper text's softmax at tau 1
SOFTMAXES = {"default": {}, "sv_softmax": {"objective": "sv_softmax", "tau": 1.0}}


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("n,m,d,masked", [(4, 10, 48, False), (3, 7, 33, True), (2, 20, 24, True)])
def test_fp32_general_position(impl, objective, n, m, d, masked):
    reps = general_position(n, m, d, seed=m + d).float()
    mask = random_mask(n, m, seed=d) if masked else None
    ref_loss, ref_grad = oracle(reps, mask, objective=objective, tau=0.8)
    loss, grad = loss_and_grad(reps, mask, impl, objective=objective, tau=0.8)
    assert loss.dtype == torch.float64  # (upcast in the helper) the fp32 loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert (grad - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_half_precision(impl, dtype, objective):
    reps = general_position(3, 10, 64, seed=7).to(dtype)
    mask = random_mask(3, 10, seed=3)
    ref_loss, ref_grad = oracle(reps, mask, objective=objective)
    x = reps.clone().to(impl_device(impl)).requires_grad_()
    loss = mlc_loss(x, mask.to(x.device), impl=impl, objective=objective, reduction="none")
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert x.grad.dtype == dtype
    rel = ((loss.double().cpu() - ref_loss).abs() / ref_loss.abs()).max()
    assert rel <= 1e-2
    cos = torch.nn.functional.cosine_similarity(x.grad.double().cpu().flatten(), ref_grad.flatten(), dim=0)
    assert cos >= 0.999
    # magnitude too, not only direction: a gradient scaled by 2 keeps its cosine. The gradient is rounded to
    # the 16-bit dtype (unit roundoff u: 2^-9 bf16, 2^-12 fp16) from an fp32 computation: norm-wise relative
    # error a few u
    u = 2.0**-9 if dtype == torch.bfloat16 else 2.0**-12
    rel_grad = (x.grad.double().cpu() - ref_grad).norm() / ref_grad.norm()
    assert rel_grad <= 4 * u, f"gradient off by {float(rel_grad):.2e} (norm-wise), bound {4 * u:.2e}"


def _converged_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    d = 32
    base = torch.randn(3, 1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scales = torch.tensor([1.0, 2.5, 0.3, 7.0, 1.0, 0.01], dtype=torch.float64)[None, :, None]
    cases = {
        "collinear_scaled": (base * scales, None),
        "duplicated": (base.expand(3, 6, d).clone(), None),
        "opposite": (base * torch.tensor([1.0, -1.0, 1.0, -2.0], dtype=torch.float64)[None, :, None], None),
        "m2_collinear": (base * torch.tensor([1.0, 3.0], dtype=torch.float64)[None, :, None], None),
        "m32_collinear": (near_collinear(2, 32, 64, 1e-6, seed=1), None),
        "m_greater_than_d": (near_collinear(2, 12, 5, 1e-3, seed=2), None),
        "masked_collinear": (base * scales, torch.tensor([[True, True, False, True, False, True]] * 3)),
    }
    for delta in (1e-6, 1e-4, 1e-3, 1e-2):
        cases[f"near_{delta:g}"] = (near_collinear(4, 10, 64, delta, seed=3), None)
    return cases


CONVERGED = _converged_cases()


@pytest.mark.parametrize("softmax", sorted(SOFTMAXES))
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("case", sorted(CONVERGED))
def test_converged_regime_fp32(impl, case, softmax):
    reps64, mask = CONVERGED[case]
    reps = reps64.float()
    ref_loss, _ = oracle(reps, mask, **SOFTMAXES[softmax])
    loss, grad = loss_and_grad(reps, mask, impl, **SOFTMAXES[softmax])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss - ref_loss).abs().max() <= 2e-4


@pytest.mark.parametrize("softmax", sorted(SOFTMAXES))
@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("case", sorted(CONVERGED))
def test_converged_regime_fp64(impl, case, softmax):
    reps64, mask = CONVERGED[case]
    ref_loss, _ = oracle(reps64, mask, **SOFTMAXES[softmax])
    loss, grad = loss_and_grad(reps64, mask, impl, **SOFTMAXES[softmax])
    assert torch.isfinite(grad).all()
    assert (loss - ref_loss).abs().max() <= 1e-7


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_m_greater_than_d_uses_min_m_d_singular_values(impl):
    # Z is 6 x 3: 3 singular values. Eigenvalues of G beyond them are structural zeros.
    reps = general_position(2, 6, 3, seed=5).float()
    z = torch.nn.functional.normalize(reps.double(), dim=-1)
    s = torch.linalg.svdvals(z)
    assert s.shape[-1] == 3
    expected = -torch.log_softmax(s, dim=-1)[:, 0]
    loss = run(reps, impl=impl, reduction="none", objective="sv_softmax", tau=1.0).double()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_masked_variant_adds_no_singular_value(impl):
    reps = general_position(2, 5, 16, seed=9).float()
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    loss = run(reps, mask, impl=impl, reduction="none")
    alone = run(reps[:1, :3], impl=impl, reduction="none")
    torch.testing.assert_close(loss[0], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_zero_vector_and_short_prompts(impl):
    reps = general_position(4, 4, 8, seed=4).float()
    reps[0, 1] = 0.0  # a zero representation: a present variant with a zero singular value
    mask = torch.tensor([[True] * 4, [True, False, False, False], [False] * 4, [True, True, False, False]])
    per_prompt, grad = loss_and_grad(reps, mask, impl)
    assert torch.isfinite(per_prompt).all() and torch.isfinite(grad).all()
    assert per_prompt[1] == 0 and per_prompt[2] == 0  # < 2 present variants: no loss
    assert (grad[1] == 0).all() and (grad[2] == 0).all()
    if impl != "reference":  # literal F.normalize differentiates r / eps there: a 1e12-scaled gradient
        assert (grad[0, 1] == 0).all()  # a zero vector has no direction: zero gradient
    mean = run(reps, mask, impl=impl)
    torch.testing.assert_close(mean.double(), (per_prompt[0] + per_prompt[3]) / 2)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_empty_batch(impl):
    x = torch.zeros(0, 5, 8, device=impl_device(impl), requires_grad=True)
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (0,))):
        loss = mlc_loss(x, impl=impl, reduction=reduction)
        assert loss.shape == shape and torch.isfinite(loss).all()
    loss = mlc_loss(x, impl=impl)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_non_finite_loss(impl, bad):
    reps = general_position(3, 4, 8, seed=1).float()
    reps[1, 2, 3] = bad
    per_prompt = run(reps, impl=impl, reduction="none")
    assert not torch.isfinite(per_prompt[1])
    assert torch.isfinite(per_prompt[[0, 2]]).all()
    assert not torch.isfinite(run(reps, impl=impl))
    # a single present variant holding NaN still poisons the mean: nothing hides behind a finite loss
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, [0, 1, 3]] = False  # only the variant holding the bad value is present
    assert not torch.isfinite(run(reps, mask, impl=impl, reduction="sum"))


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_masked_rows_are_never_read(impl):
    reps = general_position(2, 4, 8, seed=2).float()
    mask = torch.tensor([[True, True, True, False], [True, True, False, True]])
    clean = run(reps, mask, impl=impl, reduction="none")
    dirty = reps.clone()
    dirty[0, 3] = float("nan")
    dirty[1, 2] = float("inf")
    loss, grad = loss_and_grad(dirty, mask, impl)
    torch.testing.assert_close(loss, clean.double(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad).all() and (grad[0, 3] == 0).all()


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_validate_names_first_bad_prompt(impl):
    reps = general_position(5, 3, 8).float()
    reps[3, 1, 0] = float("nan")
    reps[4, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="prompt 3"):
        run(reps, impl=impl, validate=True)
    run(reps[:3], impl=impl, validate=True)  # clean input passes


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_bitwise_deterministic(impl):
    reps = general_position(3, 10, 40, seed=11).float()
    mask = random_mask(3, 10, seed=1)
    first = loss_and_grad(reps, mask, impl)
    second = loss_and_grad(reps, mask, impl)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_reductions(impl):
    reps = general_position(4, 5, 16, seed=6).float()
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2, 1:] = False  # prompt 2 has one variant: left out of the mean's denominator
    none = run(reps, mask, impl=impl, reduction="none")
    assert none.shape == (4,) and none[2] == 0
    torch.testing.assert_close(run(reps, mask, impl=impl, reduction="sum"), none.sum())
    torch.testing.assert_close(run(reps, mask, impl=impl), none.sum() / 3)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_tau_and_grad_output_scaling(impl):
    reps = general_position(3, 6, 16, seed=8).float()
    weights = torch.tensor([0.5, -2.0, 3.0])
    x = reps.clone().to(impl_device(impl)).requires_grad_()
    (mlc_loss(x, impl=impl, tau=0.3, reduction="none") * weights.to(x.device)).sum().backward()
    y = reps.double().requires_grad_()
    (mlc_loss(y, impl="reference", tau=0.3, reduction="none") * weights.double()).sum().backward()
    assert (x.grad.double().cpu() - y.grad).abs().max() <= 1e-4 * y.grad.abs().max()
