"""The native reduced op (``mlc_native.mlc_reduced``): kernel, reduction and autograd formula in C++. Equal to the
per-prompt path reduced in torch, at the edges of the reduction, and it refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch

from mlc_kernels import mlc_loss
from mlc_kernels.checks import eligible_count
from mlc_kernels.ops import per_prompt_loss


def _inputs(n=5, m=4, d=12, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    reps = torch.randn(n, m, d, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(n, m, generator=gen) > 0.3
    mask[0] = True
    mask[1, 1:] = False  # one prompt with a single variant: not in the mean's count
    return reps, mask


def _per_prompt_reduced(reps, mask, reduction, objective):
    per = per_prompt_loss("native")(reps, mask if mask is not None else torch.ones(reps.shape[:2], dtype=torch.bool),
                                    0.2, objective)  # fmt: skip
    count = (
        eligible_count(mask) if mask is not None else torch.tensor(max(1, reps.shape[0] if reps.shape[1] >= 2 else 0))
    )
    return per.sum() if reduction == "sum" else per.sum() / count.to(per.dtype)


@pytest.mark.parametrize("objective", ["relative_sv_softmax", "sv_softmax", "pairwise", "anchor_cos"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("masked", [False, True])
def test_reduced_op_equals_the_per_prompt_path(objective, reduction, masked):
    reps, mask = _inputs()
    mask = mask if masked else None
    a, b = reps.clone().requires_grad_(), reps.clone().requires_grad_()
    new = mlc_loss(a, mask, impl="native", objective=objective, reduction=reduction)
    old = _per_prompt_reduced(b, mask, reduction, objective)
    (3.0 * new).backward()  # a non-unit upstream gradient
    (3.0 * old).backward()
    assert new.shape == () and new.dtype == torch.float64
    torch.testing.assert_close(new, old.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_op_dtypes(dtype):
    reps, mask = _inputs(dtype=dtype)
    a = reps.clone().requires_grad_()
    loss = mlc_loss(a, mask, impl="native")
    loss.backward()
    assert loss.dtype == torch.float32 and a.grad.dtype == dtype
    ref = reps.double().requires_grad_()
    expect = mlc_loss(ref, mask, impl="torch")
    expect.backward()
    torch.testing.assert_close(loss.double(), expect.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.grad.double(), ref.grad, rtol=2e-2, atol=2e-3)


def test_edges_of_the_count():
    empty = torch.zeros(0, 4, 8, dtype=torch.float64, requires_grad=True)
    loss = mlc_loss(empty, impl="native")
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == empty.shape
    single = torch.randn(3, 1, 8, dtype=torch.float64, requires_grad=True)  # m = 1: no prompt is eligible
    assert mlc_loss(single, impl="native").item() == mlc_loss(single, impl="torch").item()
    reps, _ = _inputs()
    none_present = torch.zeros(reps.shape[:2], dtype=torch.bool)
    none_present[:, 0] = True  # every prompt has one variant: count clamps to 1, the loss is 0
    x = reps.clone().requires_grad_()
    loss = mlc_loss(x, none_present, impl="native")
    loss.backward()
    assert loss.item() == mlc_loss(reps, none_present, impl="torch").item() and torch.all(x.grad == 0)


def test_no_gradient_when_none_is_asked_and_inference_tensors_run():
    reps, mask = _inputs()
    with torch.no_grad():
        loss = mlc_loss(reps.clone().requires_grad_(), mask, impl="native")
    assert not loss.requires_grad
    with torch.inference_mode():
        inf = reps.clone()
        loss_inf = mlc_loss(inf, mask, impl="native")
    assert loss_inf.item() == loss.item()


def test_refuses_double_backward_and_a_second_backward():
    reps, mask = _inputs()
    x = reps.clone().requires_grad_()
    loss = mlc_loss(x, mask, impl="native")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    y = reps.clone().requires_grad_()
    loss = mlc_loss(y, mask, impl="native")
    loss.backward(retain_graph=True)
    first = y.grad.clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # would scale the saved gradient twice
    assert torch.equal(y.grad, first)
