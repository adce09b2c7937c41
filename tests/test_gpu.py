"""Tests that need a CUDA device (marked ``gpu``; skipped without one)."""

from __future__ import annotations

import pytest
import torch
from helpers import general_position, near_collinear, oracle

from mlc_kernels import mlc_loss
from mlc_kernels.loss import resolve_impl
from mlc_kernels.ops.common import OBJECTIVES

pytestmark = pytest.mark.gpu


def _loss_grad(reps: torch.Tensor, impl: str, mask=None):
    x = reps.detach().clone().cuda().requires_grad_()
    loss = mlc_loss(x, None if mask is None else mask.cuda(), impl=impl, reduction="none")
    loss.sum().backward()
    return loss.double().cpu(), x.grad.double().cpu()


def test_auto_picks_triton_on_cuda():
    assert resolve_impl("auto", torch.randn(2, 3, 4, device="cuda")) == "triton"


@pytest.mark.parametrize("m", [2, 10, 16, 17, 32])
def test_triton_fp32_large_d(m):
    reps = general_position(16, m, 4096, seed=m).float()
    mask = torch.rand(16, m, generator=torch.Generator().manual_seed(m)) > 0.2
    ref_loss, ref_grad = oracle(reps, mask)
    loss, grad = _loss_grad(reps, "triton", mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert (grad - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_large_d(dtype):
    reps = general_position(32, 10, 4096, seed=1).to(dtype)
    ref_loss, ref_grad = oracle(reps, None)
    loss, grad = _loss_grad(reps, "triton")
    assert ((loss - ref_loss).abs() / ref_loss.abs()).max() <= 1e-2
    assert torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) >= 0.999


@pytest.mark.parametrize("delta", [0.0, 1e-6, 1e-3, 1e-2])
def test_triton_converged_regime_large_d(delta):
    reps = near_collinear(16, 10, 4096, delta, seed=2).float()
    ref_loss, _ = oracle(reps, None)
    loss, grad = _loss_grad(reps, "triton")
    assert torch.isfinite(grad).all()
    assert (loss - ref_loss).abs().max() <= 2e-4


def test_triton_matches_torch_impl_on_cuda():
    reps = general_position(64, 10, 1024, seed=3).float()
    a = _loss_grad(reps, "triton")
    b = _loss_grad(reps, "torch")
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert (a[1] - b[1]).abs().max() <= 1e-4 * b[1].abs().max()


def test_triton_bitwise_deterministic_on_cuda():
    reps = general_position(128, 10, 2048, seed=4).bfloat16()
    a, b = _loss_grad(reps, "triton"), _loss_grad(reps, "triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_triton_op_under_torch_compile():
    reps = general_position(8, 10, 256, seed=5).float().cuda()

    def step(x):
        return mlc_loss(x, impl="triton") * 3.0

    compiled = torch.compile(step, fullgraph=True)
    x1, x2 = reps.clone().requires_grad_(), reps.clone().requires_grad_()
    eager = step(x1)
    eager.backward()
    out = compiled(x2)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_triton_peak_memory_at_most_1_1x_reps():
    reps = torch.randn(1024, 10, 4096, device="cuda", dtype=torch.bfloat16).requires_grad_()
    mlc_loss(reps, impl="triton").backward()
    reps.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mlc_loss(reps, impl="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 1.1 * reps.numel() * reps.element_size()


@pytest.mark.parametrize("anchor", [False, True])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_triton_all_objectives_large_d(objective, anchor):
    from test_triton_objectives import _inputs, _oracle

    from mlc_kernels.ops.triton import triton_loss_and_grad

    reps, present = _inputs(64, 12, 2048, seed=21)
    ref_loss, ref_grad = _oracle(reps, present, objective, anchor)
    loss, grad = triton_loss_and_grad(reps.cuda(), present.cuda(), 0.7, objective, anchor)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-6)
    assert (grad.double().cpu() - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()
    half, _ = triton_loss_and_grad(reps.cuda().bfloat16(), present.cuda(), 0.7, objective, anchor)
    assert torch.isfinite(half).all()


def test_triton_loss_only_reads_reps_once_and_writes_no_gradient():
    reps = torch.randn(1024, 10, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        mlc_loss(reps, impl="triton")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        mlc_loss(reps, impl="triton")
        torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 0.05 * reps.numel() * reps.element_size()
