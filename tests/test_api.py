"""Argument checking, impl selection, the module, metrics, autograd and torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import general_position, impl_device

import mlc_kernels
from mlc_kernels import ImplementationUnavailableError, MLCLoss, consistency_metrics, mlc_loss
from mlc_kernels.loss import resolve_impl
from mlc_kernels.ops.native import native_error


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"reps": torch.zeros(3, 4)}, ValueError, "reps must have shape \\(N, m, d\\)"),
        ({"reps": torch.zeros(2, 3, 4, dtype=torch.int64)}, TypeError, "reps must be float16"),
        ({"reps": [[1.0]]}, TypeError, "reps must be a torch.Tensor"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "mask must have shape \\(N, m\\) = \\(2, 3\\)"),
        ({"mask": torch.ones(2, 3)}, TypeError, "mask must be a bool tensor"),
        ({"tau": 0.0}, ValueError, "tau must be a finite float > 0"),
        ({"tau": float("nan")}, ValueError, "tau must be"),
        ({"objective": "svd"}, ValueError, "objective must be one of"),
        ({"reduction": "max"}, ValueError, "reduction must be one of"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
        ({"reps": torch.zeros(2, 0, 4)}, ValueError, "m >= 1 variants"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, exc, match):
    args = {"reps": torch.randn(2, 3, 4), **kwargs}
    reps = args.pop("reps")
    with pytest.raises(exc, match=match):
        mlc_loss(reps, **args)


def test_explicit_triton_without_device_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ImplementationUnavailableError, match="needs reps on cuda or meta, got reps on cpu"):
        mlc_loss(torch.randn(2, 3, 4), impl="triton")


def test_triton_limits_are_named():
    with pytest.raises(ValueError, match="at most 32 variants"):
        mlc_loss(torch.randn(2, 33, 4), impl="triton")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        mlc_loss(torch.randn(2, 3, 4, dtype=torch.float64), impl="triton")


def test_auto_picks_native_on_cpu():
    assert resolve_impl("auto", torch.randn(2, 3, 4)) == "native"
    assert resolve_impl("torch", torch.randn(2, 3, 4)) == "torch"


def test_module_matches_function():
    reps = general_position(3, 5, 8).float()
    module = MLCLoss(tau=0.5, objective="rank1", reduction="sum", impl="torch")
    assert "rank1" in repr(module)
    torch.testing.assert_close(module(reps), mlc_loss(reps, tau=0.5, objective="rank1", reduction="sum"))


def test_loss_dtype_follows_input():
    assert mlc_loss(torch.randn(2, 3, 4, dtype=torch.float64)).dtype == torch.float64
    assert mlc_loss(torch.randn(2, 3, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_gradcheck_torch_impl():
    reps = general_position(2, 4, 6, seed=3).requires_grad_()
    mask = torch.tensor([[True, True, True, True], [True, False, True, True]])
    for objective in ("sv_softmax", "rank1", "pairwise"):
        assert torch.autograd.gradcheck(
            lambda x, objective=objective: mlc_loss(
                x, mask, impl="torch", objective=objective, tau=1.0, reduction="none"
            ),
            (reps,),
        )


@pytest.mark.parametrize("objective", ["sv_softmax", "rank1", "pairwise"])
def test_native_directional_derivatives_float64(objective):
    # gradcheck backpropagates the same graph many times, which the native impl's in-place backward
    # refuses; central differences along random directions check the same thing.
    reps = general_position(3, 5, 7, seed=4)
    mask = torch.tensor([[True] * 5, [True, False, True, True, True], [True, True, False, False, True]])
    weights = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    x = reps.clone().requires_grad_()
    (mlc_loss(x, mask, impl="native", objective=objective, tau=1.0, reduction="none") * weights).sum().backward()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = torch.randn(reps.shape, generator=gen, dtype=torch.float64)
        eps = 1e-6

        def f(y):
            return (mlc_loss(y, mask, impl="native", objective=objective, tau=1.0, reduction="none") * weights).sum()

        numeric = (f(reps + eps * v) - f(reps - eps * v)) / (2 * eps)
        torch.testing.assert_close((x.grad * v).sum(), numeric, rtol=1e-6, atol=1e-8)


def test_native_is_built_here():
    # CI must build and test the native kernel: a machine with a C++ compiler always has it.
    assert native_error() is None, native_error()


def test_native_unavailable_raises_when_explicit_and_warns_once_for_auto(monkeypatch):
    from mlc_kernels.ops import native

    monkeypatch.setitem(native._state, "error", OSError("no compiler"))
    monkeypatch.setitem(native._state, "warned", False)
    with pytest.raises(ImplementationUnavailableError, match="impl='native' could not be built: OSError"):
        mlc_loss(torch.randn(2, 3, 4), impl="native")
    with pytest.warns(RuntimeWarning, match="native CPU kernel unavailable"):
        assert resolve_impl("auto", torch.randn(2, 3, 4)) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("auto", torch.randn(2, 3, 4)) == "torch"  # said once only


def test_torch_compile_fullgraph():
    reps = general_position(3, 6, 16, seed=2).float()
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False

    def step(x, mask):
        return mlc_loss(x, mask, impl="torch") * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = reps.clone().requires_grad_()
    x2 = reps.clone().requires_grad_()
    eager = step(x1, mask)
    eager.backward()
    out = compiled(x2, mask)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_triton_backward_twice_with_retain_graph():
    # the forward saves B, not the gradient: a second backward recomputes the same gradient
    x = general_position(2, 3, 8).float().to(impl_device("triton")).requires_grad_()
    loss = mlc_loss(x, impl="triton")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_consistency_metrics_values():
    d = 16
    u = torch.randn(1, 1, d)
    collinear = u * torch.tensor([1.0, 2.0, 0.5])[None, :, None]
    eye = torch.eye(3, d)[None]
    reps = torch.cat([collinear, eye])
    mask = torch.tensor([[True, True, True], [True, True, True]])
    out = consistency_metrics(reps, mask)
    torch.testing.assert_close(out["s1_share"], torch.tensor([1.0, 1 / 3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["mean_cosine"], torch.tensor([1.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["cosine_to_consensus"][0], torch.ones(3), atol=1e-5, rtol=0)
    assert out["valid"].all()


def test_between_prompt_cosine_value():
    """Two prompts, each collinear on its own direction: the metric is |cos| of the two directions."""
    u, v = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    reps = torch.stack([u[None] * torch.tensor([[1.0], [2.0], [0.5]]), v[None] * torch.tensor([[3.0], [-1.0], [1.0]])])
    out = consistency_metrics(reps)
    expected = abs(float(u @ v) / float(u.norm() * v.norm()))
    assert out["between_prompt_cosine"].item() == pytest.approx(expected, abs=1e-5)


def test_consistency_metrics_detect_collapse():
    direction = torch.randn(1, 1, 32)
    collapsed = direction + 1e-3 * torch.randn(8, 4, 32)
    spread = torch.randn(8, 1, 32) + 1e-3 * torch.randn(8, 4, 32)
    hi = consistency_metrics(collapsed)
    lo = consistency_metrics(spread)
    assert hi["between_prompt_cosine"] > 0.99 and hi["between_prompt_s1_share"] > 0.99
    assert lo["between_prompt_cosine"] < 0.5 and lo["between_prompt_s1_share"] < 0.6
    assert (hi["s1_share"] > 0.99).all() and (lo["s1_share"] > 0.99).all()


def test_consistency_metrics_masks_and_no_grad():
    reps = torch.randn(3, 4, 8, requires_grad=True)
    mask = torch.tensor([[True, True, False, True], [True, False, False, False], [True] * 4])
    out = consistency_metrics(reps, mask)
    assert not out["s1_share"].requires_grad
    assert torch.isnan(out["s1_share"][1]) and torch.isnan(out["cosine_to_consensus"][0, 2])
    assert out["valid"].tolist() == [True, False, True]


def test_public_names():
    for name in ("mlc_loss", "MLCLoss", "consistency_metrics", "__version__"):
        assert hasattr(mlc_kernels, name)


def test_mean_leaves_prompts_with_fewer_than_two_variants_out_of_the_denominator():
    reps = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False], [True, False, True]])
    per_prompt = mlc_loss(reps, mask, reduction="none", impl="torch")
    assert per_prompt[1] == 0 and per_prompt[2] == 0
    mean = mlc_loss(reps, mask, impl="torch")
    torch.testing.assert_close(mean, (per_prompt[0] + per_prompt[3]) / 2)
    assert float(mlc_loss(reps, torch.zeros_like(mask), impl="torch")) == 0.0  # no eligible prompt: 0
