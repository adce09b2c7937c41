"""Input generators and the float64 oracle shared by the tests."""

from __future__ import annotations

import math

import torch

from mlc_kernels import mlc_loss


def general_position(n: int, m: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Random ``(n, m, d)`` representations: a shared direction per prompt plus strong noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, d, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, m, d, generator=gen, dtype=torch.float64)
    scale = torch.rand(n, m, 1, generator=gen, dtype=torch.float64) * 2 + 0.5
    return ((base + noise) * scale).to(dtype)


def near_collinear(n: int, m: int, d: int, delta: float, seed: int = 0) -> torch.Tensor:
    """Variants ``u + delta * noise`` (relative noise norm about delta), with random positive scales (fp64)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 1, d, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, m, d, generator=gen, dtype=torch.float64) / math.sqrt(d) * u.norm(dim=-1, keepdim=True)
    scale = torch.rand(n, m, 1, generator=gen, dtype=torch.float64) * 3 + 0.1
    return (u + delta * noise) * scale


def random_mask(n: int, m: int, seed: int = 0, p_missing: float = 0.25) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, m, generator=gen) >= p_missing


def impl_device(impl: str) -> torch.device:
    """Where ``impl`` runs in the tests: triton on CUDA when there is one (else the interpreter on CPU)."""
    return torch.device("cuda" if impl == "triton" and torch.cuda.is_available() else "cpu")


def run(reps: torch.Tensor, mask=None, *, impl: str, **kw) -> torch.Tensor:
    """``mlc_loss`` on the impl's device; the result comes back on CPU."""
    dev = impl_device(impl)
    return mlc_loss(reps.to(dev), None if mask is None else mask.to(dev), impl=impl, **kw).cpu()


def loss_and_grad(reps: torch.Tensor, mask, impl: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt losses ``(N,)`` (float64) and the gradient of their sum w.r.t. reps (float64), on CPU."""
    dev = impl_device(impl)
    x = reps.detach().clone().to(dev).requires_grad_()
    per_prompt = mlc_loss(x, None if mask is None else mask.to(dev), impl=impl, reduction="none", **kw)
    per_prompt.sum().backward()
    return per_prompt.detach().double().cpu(), x.grad.double().cpu()


def oracle(reps: torch.Tensor, mask, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference on exactly the values of ``reps`` (upcast)."""
    return loss_and_grad(reps.detach().double(), mask, "reference", **kw)
