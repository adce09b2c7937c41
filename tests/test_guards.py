"""Signed objectives, the anchor flag, the collapse guards (mlc_kernels.guards) and the collapse diagnostics."""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from helpers import general_position, impl_device

from mlc_kernels import MLCHead, MLCLoss, consistency_metrics, fused_linear_mlc_loss, mlc_loss
from mlc_kernels.checks import eligible_count
from mlc_kernels.guards import GUARDS, parse_guard, signed_consensus, uniformity, valid_guards, whiten
from mlc_kernels.ops import per_prompt_loss, per_prompt_loss_and_grad
from mlc_kernels.ops.common import OBJECTIVES

IMPLS = ["reference", "torch", "native", "triton"]
TAU = 0.7


def _inputs(n=7, m=4, d=6, seed=0):
    reps = general_position(n, m, d, seed=seed)
    reps[1, 2] = -reps[1, 2]  # a sign-flipped row
    present = torch.ones(n, m, dtype=torch.bool)
    present[2, 0] = False  # base row is variant 1
    present[3, :2] = False  # base row is variant 2
    present[4, 1:] = False  # a single variant: loss 0
    present[5, 3] = False
    reps[~present] = float("nan")  # masked rows are never read
    return reps, present


def oracle(reps: torch.Tensor, present: torch.Tensor, tau: float, objective: str, anchor: bool) -> torch.Tensor:
    """The definitions of ops.common.OBJECTIVES, prompt by prompt, in float64 with plain autograd."""
    out = []
    for n in range(reps.shape[0]):
        idx = present[n].nonzero().flatten()
        x = reps[n, idx].double()
        if idx.numel() < 2:
            out.append(0.0 * x.sum())
            continue
        z = x / x.norm(dim=-1, keepdim=True)
        if anchor or objective == "anchor_cos":  # anchor_cos stops the gradient of the base row by definition
            z = torch.cat([z[:1].detach(), z[1:]])
        c = z.shape[0]
        gram = z @ z.T
        iu = torch.triu_indices(c, c, offset=1)
        s = torch.linalg.svdvals(z)
        if objective == "sv_softmax":
            loss = -torch.log_softmax(s / tau, dim=0)[0]
        elif objective == "rank1":
            loss = 1 - s[0] ** 2 / c
        elif objective == "pairwise":
            loss = (1 - gram[iu[0], iu[1]] ** 2).mean()
        elif objective == "signed_pairwise":
            loss = (1 - gram[iu[0], iu[1]]).mean()
        elif objective == "anchor_cos":
            loss = (1 - z[1:] @ z[0]).mean()
        elif objective == "relative_sv_softmax":
            loss = -torch.log_softmax(s / (s[:1].detach() + 1e-12) / tau, dim=0)[0]
        else:
            rho = z.sum(dim=0).norm() / math.sqrt(c)
            loss = -torch.log_softmax(torch.cat([rho[None], s[1:]]) / tau, dim=0)[0]
        out.append(loss)
    return torch.stack(out)


def _oracle_grad(reps, present, objective, anchor):
    leaf = torch.where(present[..., None], reps, 0.0).requires_grad_()
    loss = oracle(leaf, present, TAU, objective, anchor)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def _loss_and_grad(impl, reps, present, objective, anchor):
    device = impl_device(impl)
    if impl == "triton":
        reps = reps.float()
    try:
        loss, grad = per_prompt_loss_and_grad(impl)(reps.to(device), present.to(device), TAU, objective, anchor)
    except NotImplementedError as err:  # the Triton kernel without the signed objectives / anchor flag
        pytest.skip(str(err))
    return loss.cpu().double(), grad.cpu().double()


@pytest.mark.parametrize("anchor", [False, True])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("impl", IMPLS)
def test_objective_and_anchor_match_the_float64_oracle(impl, objective, anchor):
    reps, present = _inputs()
    ref_loss, ref_grad = _oracle_grad(reps, present, objective, anchor)
    loss, grad = _loss_and_grad(impl, reps, present, objective, anchor)
    tol = 2e-5 if impl == "triton" else 1e-10
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    grad = torch.where(present[..., None], grad, 0.0)
    torch.testing.assert_close(grad, ref_grad, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("objective", ["signed_pairwise", "anchor_cos", "signed_sv_softmax"])
@pytest.mark.parametrize("impl", ["torch", "native"])
def test_signed_objectives_directional_finite_difference(impl, objective):
    reps, present = _inputs(d=4, seed=3)
    reps = torch.where(present[..., None], reps, 0.0)
    _, grad = per_prompt_loss_and_grad(impl)(reps, present, TAU, objective)
    direction = torch.randn(reps.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    movable = present.clone()
    if objective == "anchor_cos":  # stop-gradient on the base row by definition: move only the others
        movable[torch.arange(present.shape[0]), torch.argmax(present.to(torch.uint8), dim=1)] = False
    direction = torch.where(movable[..., None], direction, 0.0)
    h = 1e-6
    fn = per_prompt_loss(impl)
    fd = (fn(reps + h * direction, present, TAU, objective) - fn(reps - h * direction, present, TAU, objective)) / (
        2 * h
    )
    torch.testing.assert_close((grad * direction).sum(dim=(1, 2)), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("objective", ["signed_pairwise", "signed_sv_softmax"])  # anchor_cos: see the test above
def test_signed_objectives_gradcheck_torch(objective):
    reps, present = _inputs(d=4, seed=5)
    reps = torch.where(present[..., None], reps, 0.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda r: mlc_loss(r, present, tau=TAU, objective=objective, impl="torch"), reps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("objective", ["signed_pairwise", "anchor_cos", "signed_sv_softmax"])
@pytest.mark.parametrize("impl", ["torch", "native"])
def test_signed_objectives_16bit_gradient_magnitude(impl, objective, dtype):
    reps, present = _inputs(d=32, seed=2)
    low = torch.where(present[..., None], reps, 0.0).to(dtype)
    ref_loss, ref_grad = _oracle_grad(low.double(), present, objective, anchor=True)
    loss, grad = per_prompt_loss_and_grad(impl)(low, present, TAU, objective, True)
    assert grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    err = (grad.double() - ref_grad).flatten(1).norm(dim=1)
    scale = ref_grad.flatten(1).norm(dim=1)
    assert bool((err <= 4 * eps * scale + 1e-6).all()), (err / scale.clamp_min(1e-12)).tolist()
    # magnitudes, not only directions
    assert bool(((grad.double().flatten(1).norm(dim=1) - scale).abs() <= 4 * eps * scale + 1e-6).all())


@pytest.mark.parametrize("impl", ["reference", "torch", "native"])
def test_anchor_zeroes_the_base_row_gradient_and_keeps_the_loss(impl):
    reps, present = _inputs()
    base = torch.argmax(present.to(torch.uint8), dim=1)
    for objective in OBJECTIVES:
        loss0, grad0 = per_prompt_loss_and_grad(impl)(reps, present, TAU, objective, False)
        loss1, grad1 = per_prompt_loss_and_grad(impl)(reps, present, TAU, objective, True)
        assert torch.equal(loss0, loss1) or torch.allclose(loss0, loss1, rtol=0, atol=1e-15)
        rows = torch.arange(reps.shape[0])
        assert bool((grad1[rows, base] == 0).all()), objective
        others = present.clone()
        others[rows, base] = False
        if objective != "anchor_cos":  # its base row has no gradient either way
            assert bool((grad0[rows, base][present.sum(1) >= 2] != 0).any()), objective
        if objective in ("signed_pairwise", "anchor_cos"):  # the other rows' gradient does not depend on b's
            torch.testing.assert_close(grad1[others], grad0[others], rtol=1e-12, atol=1e-14)


def test_anchor_through_the_public_api_and_autograd():
    reps, present = _inputs()
    leaf = torch.where(present[..., None], reps, 0.0).requires_grad_()
    plain = mlc_loss(leaf, present, impl="torch")
    anchored = mlc_loss(leaf, present, impl="torch", guard="anchor")
    torch.testing.assert_close(plain, anchored, rtol=0, atol=1e-15)
    (grad,) = torch.autograd.grad(anchored, leaf)
    base = torch.argmax(present.to(torch.uint8), dim=1)
    assert bool((grad[torch.arange(len(base)), base] == 0).all())


# ---------------------------------------------------------------- guards


def test_guard_none_is_bitwise_the_old_path():
    reps, present = _inputs()
    reps = torch.where(present[..., None], reps, 0.0).float()
    for impl in ("torch", "native", "reference"):
        for reduction in ("mean", "sum", "none"):
            a = reps.clone().requires_grad_()
            b = reps.clone().requires_grad_()
            new = mlc_loss(a, present, impl=impl, objective="sv_softmax", tau=1.0, reduction=reduction, guard=None)
            per_prompt = per_prompt_loss(impl)(b, present, 1.0, "sv_softmax")  # the code path before guards
            old = {"none": per_prompt, "sum": per_prompt.sum()}.get(reduction)
            if old is None:
                old = per_prompt.sum() / eligible_count(present).to(torch.float32)
            new.sum().backward()
            old.sum().backward()
            if impl == "native" and reduction != "none":  # the reduced C++ op: sum in double, 1/count inside B
                torch.testing.assert_close(new, old.detach(), rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
                continue
            assert torch.equal(new, old)
            assert torch.equal(a.grad, b.grad)
    h = torch.randn(5, 3, 8)
    w, bias = torch.randn(4, 8), torch.randn(4)
    plain = fused_linear_mlc_loss(h, w, bias, impl="native")
    assert torch.equal(plain, fused_linear_mlc_loss(h, w, bias, impl="native", guard=None))


def test_unknown_or_invalid_guards_are_refused_naming_the_valid_components():
    reps = torch.randn(3, 2, 4)
    for bad in ("centre", "center+bogus", "uniform", "uniform+anchor", "center+whiten", "center+center", "", 3):
        with pytest.raises(ValueError, match="valid components") as info:
            mlc_loss(reps, guard=bad)
        assert all(name in str(info.value) for name in GUARDS)
    with pytest.raises(ValueError, match="valid components"):
        fused_linear_mlc_loss(reps, torch.randn(3, 4), guard="nope")
    with pytest.raises(ValueError, match="valid components"):
        MLCLoss(guard="nope")
    with pytest.raises(ValueError, match="reduction='none'"):
        mlc_loss(reps, guard="center+uniform", reduction="none")
    assert {"center+anchor", "center+uniform", "whiten+anchor", "center+uniform+anchor"} <= set(valid_guards())
    assert parse_guard("anchor+center") == parse_guard("center+anchor")


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("guard", ["center", "center+anchor", "whiten", "center+uniform"])
def test_center_and_whiten_cancel_a_shared_vector(impl, guard):
    reps, present = _inputs(n=12, m=4, d=5)
    shift = 3.0 * torch.randn(5, dtype=torch.float64)
    a = mlc_loss(reps, present, impl=impl, guard=guard, objective="signed_sv_softmax")
    b = mlc_loss(reps + shift, present, impl=impl, guard=guard, objective="signed_sv_softmax")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(mlc_loss(reps, present, impl=impl), mlc_loss(reps + shift, present, impl=impl))


def test_whiten_gives_identity_covariance_without_shrinkage_and_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    reps = torch.randn(40, 3, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen).double()
    present = torch.rand(40, 3, generator=gen) > 0.2
    out = whiten(reps + 5.0, present, shrinkage=0.0)[present]
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    cov = out.T @ out / out.shape[0]
    torch.testing.assert_close(cov, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    shrunk = whiten(reps, present)[present]  # default shrinkage: d / (n + d)
    assert not torch.allclose(shrunk.T @ shrunk / shrunk.shape[0], torch.eye(6, dtype=torch.float64), atol=1e-3)
    small = reps[:4, :, :3].clone().requires_grad_()
    mask = present[:4]
    assert torch.autograd.gradcheck(lambda r: whiten(r, mask, shrinkage=0.3), small)
    # sv_softmax: the default relative_sv_softmax stops the gradient through s_1, which finite differences do not
    assert torch.autograd.gradcheck(
        lambda r: mlc_loss(r, mask, impl="torch", guard="whiten", objective="sv_softmax", tau=1.0), small
    )
    with pytest.raises(ValueError, match="not positive definite"):
        whiten(reps[:2], present[:2], shrinkage=0.0)  # at most 6 rows in 6 dims: singular


def test_uniformity_is_zero_when_collapsed_and_negative_when_spread():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(16, generator=gen, dtype=torch.float64)
    collapsed = u.expand(10, 3, 16) * torch.rand(10, 3, 1, generator=gen, dtype=torch.float64)
    collapsed = collapsed.clone()
    collapsed[2, 1] *= -1  # a flipped row does not change the sign-aligned consensus
    present = torch.ones(10, 3, dtype=torch.bool)
    assert abs(float(uniformity(collapsed, present))) < 1e-12
    spread = torch.randn(200, 3, 64, generator=gen, dtype=torch.float64)
    value = float(uniformity(spread, torch.ones(200, 3, dtype=torch.bool), t=2.0))
    assert -4.0 < value < -3.0  # about -2t for near-orthogonal directions
    loss = mlc_loss(spread, impl="torch", guard="center+uniform", uniform_weight=0.5)
    plain = mlc_loss(spread - spread.mean(dim=(0, 1)), impl="torch")
    expected = plain + 0.5 * uniformity(spread - spread.mean(dim=(0, 1)), torch.ones(200, 3, dtype=torch.bool))
    torch.testing.assert_close(loss, expected)
    total = mlc_loss(spread, impl="torch", guard="center+uniform", uniform_weight=0.5, reduction="sum")
    torch.testing.assert_close(total, loss * 200)


GUARD_CASES = [None, "center", "anchor", "center+anchor", "center+uniform", "whiten", "whiten+anchor",
               "center+uniform+anchor"]  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("guard", GUARD_CASES)
@pytest.mark.parametrize("impl", ["torch", "native"])
def test_fused_linear_with_each_guard_equals_the_unfused_loss(impl, guard, reduction):
    if reduction == "none" and guard is not None and "uniform" in guard:
        pytest.skip("refused")
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(9, 3, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    mask = torch.rand(9, 3, generator=gen) > 0.25

    objective = "signed_sv_softmax"
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    ref = mlc_loss(F.linear(*leaves), mask, impl=impl, guard=guard, reduction=reduction, objective=objective)
    ref_grads = torch.autograd.grad(ref.sum(), leaves, allow_unused=True)
    fused_leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    got = fused_linear_mlc_loss(*fused_leaves, mask, impl=impl, guard=guard, reduction=reduction, objective=objective,
                                chunk_size=4)  # fmt: skip
    grads = torch.autograd.grad(got.sum(), fused_leaves, allow_unused=True)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        r = torch.zeros_like(g) if r is None else r
        g = torch.zeros_like(r) if g is None else g
        if name == "hidden":
            g, r = torch.where(mask[..., None], g, 0.0), torch.where(mask[..., None], r, 0.0)
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11, msg=f"{name}: {guard}")


def test_head_loss_takes_the_guard_and_orthogonal_heads_save_and_load(tmp_path):
    torch.manual_seed(0)
    head = MLCHead(8, 4, bias=False, orthogonal=True)
    weight = head.weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(4), atol=1e-5, rtol=0)
    h = torch.randn(6, 3, 8)
    loss = head.loss(h, guard="center+anchor", impl="torch")
    expected = mlc_loss(F.linear(h, head.weight), guard="center+anchor", impl="torch")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    head.save_pretrained(tmp_path)
    loaded = MLCHead.from_pretrained(tmp_path)
    assert loaded.orthogonal and loaded.bias is None
    torch.testing.assert_close(loaded.weight, head.weight, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    plain = MLCHead(8, 4)
    assert plain.config() == {"hidden_size": 8, "rep_size": 4, "bias": True}  # the default is unchanged


# ---------------------------------------------------------------- diagnostics


def test_collapse_diagnostics_and_sign_flips():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(16, generator=gen)
    reps = u.expand(6, 4, 16) + 1e-4 * torch.randn(6, 4, 16, generator=gen)
    reps[1, 2] *= -1
    reps[3, 1] *= -1
    reps[4, 0] *= -1  # a flipped base row: the other three rows count as flipped
    stats = consistency_metrics(reps)
    assert float(stats["signed_between_prompt_cosine"]) < 0.7  # prompt 4's consensus is -u: signed, not |cos|
    torch.testing.assert_close(stats["sign_flip_share"], torch.tensor(5 / 18))
    assert float(stats["consensus_effective_rank"]) < 1.01
    reps[4, 0] *= -1
    stats = consistency_metrics(reps)
    assert float(stats["signed_between_prompt_cosine"]) > 0.999
    torch.testing.assert_close(stats["sign_flip_share"], torch.tensor(2 / 18))
    spread = consistency_metrics(torch.randn(20, 4, 64, generator=gen))
    assert abs(float(spread["signed_between_prompt_cosine"])) < 0.2
    assert float(spread["consensus_effective_rank"]) > 10
    # signed, not |cos|: two opposite clusters of prompts
    half = u.expand(6, 4, 16).clone()
    half[3:] *= -1
    stats = consistency_metrics(half)
    assert float(stats["between_prompt_cosine"]) > 0.999
    assert float(stats["signed_between_prompt_cosine"]) < 0.0
    c, _, sign = signed_consensus(reps, torch.ones(6, 4, dtype=torch.bool))
    assert sign[1, 2] == -1 and sign[1, 0] == 1


# ---------------------------------------------------------------- trainers


def _fake_trainer(**options):
    from mlc_kernels.trainers import MLCArguments, MLCTrainerMixin

    class Fake(MLCTrainerMixin):
        def __init__(self, args):
            self.mlc_args = args
            self._collapse_streak, self._collapse_warned, self._spread_start = 0, False, None
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    return Fake(MLCArguments(languages=("en", "zh"), **options))


def _anisotropic(n: int = 12, seed: int = 0) -> torch.Tensor:
    """Raw hidden states as they come: a large component shared by every prompt plus a prompt-specific part."""
    gen = torch.Generator().manual_seed(seed)
    shared = 6.0 * torch.randn(1, 1, 8, generator=gen)
    return shared + torch.randn(n, 1, 8, generator=gen) + 0.3 * torch.randn(n, 2, 8, generator=gen)


def test_collapse_warning_stays_silent_on_a_shared_mean(caplog):
    # plain alignment on raw anisotropic states: the mean |cosine| between prompts is above 0.9 from the start
    # (the old criterion fired here); the spread does not fall relative to its start, so no warning
    pytest.importorskip("transformers")
    trainer = _fake_trainer(collapse_warn_patience=2)
    model = torch.nn.Linear(1, 1).train()
    head = MLCHead(8, 8)
    with torch.no_grad():
        head.weight.copy_(torch.eye(8))
        head.bias.zero_()
    mask = torch.ones(12, 2, dtype=torch.bool)
    with caplog.at_level(logging.WARNING, logger="mlc_kernels.trainers"):
        for step in range(6):
            trainer._log_consistency(model, head, _anisotropic(seed=step), mask, torch.tensor(1.0))
    assert min(trainer._metrics["train"]["mlc/between_prompt_cosine"]) > 0.9
    assert not [r for r in caplog.records if "collapse" in r.getMessage()]


def test_trainer_warns_once_when_the_prompts_collapse(caplog):
    pytest.importorskip("transformers")
    trainer = _fake_trainer(collapse_warn_patience=3)
    model = torch.nn.Linear(1, 1).train()
    head = MLCHead(8, 4)
    reps = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(0)).abs()
    mask = torch.ones(5, 2, dtype=torch.bool)
    with caplog.at_level(logging.WARNING, logger="mlc_kernels.trainers"):
        trainer._log_consistency(model, head, reps, mask, torch.tensor(1.0))  # the reference spread
        with torch.no_grad():  # rank-1 extractor: every representation on one line
            head.weight.copy_(torch.outer(torch.randn(4), torch.randn(8)).abs())
            head.bias.zero_()
        for _ in range(2):
            trainer._log_consistency(model, head, reps, mask, torch.tensor(1.0))
        assert not caplog.records
        for _ in range(4):
            trainer._log_consistency(model, head, reps, mask, torch.tensor(1.0))
    warnings = [r for r in caplog.records if "collapse" in r.getMessage()]
    assert len(warnings) == 1
    assert "between_prompt_spread" in warnings[0].getMessage() and "guard" in warnings[0].getMessage()
    logged = trainer._metrics["train"]
    assert {"mlc/signed_between_prompt_cosine", "mlc/consensus_effective_rank", "mlc/sign_flip_share",
            "mlc/between_prompt_spread"} <= set(logged)  # fmt: skip
    assert logged["mlc/between_prompt_spread"][-1] < 1e-6 < logged["mlc/between_prompt_spread"][0]


def test_collapse_warn_ratio_is_read(caplog):
    # ratio 0: nothing is below 0 x the start, so the same collapse stays silent
    pytest.importorskip("transformers")
    trainer = _fake_trainer(collapse_warn_patience=1, collapse_warn_ratio=0.0)
    model = torch.nn.Linear(1, 1).train()
    head = MLCHead(8, 4)
    reps = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(0)).abs()
    mask = torch.ones(5, 2, dtype=torch.bool)
    with caplog.at_level(logging.WARNING, logger="mlc_kernels.trainers"):
        trainer._log_consistency(model, head, reps, mask, torch.tensor(1.0))
        with torch.no_grad():
            head.weight.copy_(torch.outer(torch.randn(4), torch.randn(8)).abs())
        for _ in range(3):
            trainer._log_consistency(model, head, reps, mask, torch.tensor(1.0))
    assert not [r for r in caplog.records if "collapse" in r.getMessage()]


def test_mlc_arguments_put_the_base_language_first_and_check_the_guard():
    pytest.importorskip("transformers")
    from mlc_kernels.trainers import MLCArguments

    args = MLCArguments(languages=("zh", "en", "sw"), base_language="en")
    assert args.languages == ("en", "zh", "sw")
    from trl_fixtures import tiny_model

    model = tiny_model(65)
    with pytest.raises(ValueError, match="valid components"):
        MLCArguments(languages=("en", "zh"), guard="centre").check(model)
    with pytest.raises(ValueError, match="uniform_weight"):
        MLCArguments(languages=("en", "zh"), guard="center+uniform", uniform_weight=-1.0).check(model)
    args = MLCArguments(languages=("en", "zh"), guard="center+anchor")
    args.check(model)
    args.languages = ("zh", "en")
    with pytest.raises(ValueError, match="must start with base_language"):
        args.check(model)


def test_non_finite_rows_give_nan_not_an_error():
    """A NaN in a present row: NaN loss under every guard (never a finite loss, never a misleading error), and
    NaN metrics for that prompt, which stays out of the batch-level diagnostics."""
    from mlc_kernels.metrics import consistency_metrics

    reps = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    reps[1, 2, 3] = float("nan")
    for guard in (None, "center", "whiten", "center+uniform", "anchor"):
        assert torch.isnan(mlc_loss(reps, impl="torch", guard=guard)), guard
    stats = consistency_metrics(reps)
    assert stats["valid"].tolist() == [True, False, True, True]
    assert torch.isnan(stats["s1_share"][1]) and torch.isfinite(stats["s1_share"][[0, 2, 3]]).all()
    clean = consistency_metrics(reps[[0, 2, 3]])
    for key in ("between_prompt_cosine", "signed_between_prompt_cosine", "consensus_effective_rank"):
        torch.testing.assert_close(stats[key], clean[key])
