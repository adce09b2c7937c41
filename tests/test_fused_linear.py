"""The extractor fused with the loss (``fused_linear_mlc_loss``) and ``MLCHead`` checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers import impl_device
from torch.utils._python_dispatch import TorchDispatchMode

from mlc_kernels import FusedLinearMLCLoss, MLCHead, fused_linear_mlc_loss, mlc_loss


def _problem(n=7, m=5, dh=12, d=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, m, dh, generator=gen, dtype=torch.float64)
    weight = torch.randn(d, dh, generator=gen, dtype=torch.float64) / dh**0.5
    bias = torch.randn(d, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, m, generator=gen) > 0.25
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), mask


def _grads(fn, tensors, weights=None):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    (out if out.dim() == 0 else (out * weights).sum()).backward()
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("impl", ["reference", "torch", "native"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_matches_unfused_reference_float64(impl, reduction, chunk_size):
    hidden, weight, bias, mask = _problem()
    weights = torch.linspace(-1, 2, hidden.shape[0], dtype=torch.float64)
    fused, fused_grads = _grads(
        lambda h, w, b: fused_linear_mlc_loss(h, w, b, mask, impl=impl, reduction=reduction, chunk_size=chunk_size),
        (hidden, weight, bias),
        weights,
    )
    ref, ref_grads = _grads(
        lambda h, w, b: mlc_loss(h @ w.T + b, mask, impl="reference", reduction=reduction),
        (hidden, weight, bias),
        weights,
    )
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_triton_impl_matches_unfused():
    dev = impl_device("triton")
    hidden, weight, bias, mask = (t.float().to(dev) if t.dtype != torch.bool else t.to(dev) for t in _problem())
    fused, fused_grads = _grads(
        lambda h, w, b: fused_linear_mlc_loss(h, w, b, mask, impl="triton", chunk_size=3), (hidden, weight, bias)
    )
    ref, ref_grads = _grads(lambda h, w, b: mlc_loss(h @ w.T + b, mask, impl="torch"), (hidden, weight, bias))
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, ref_grads, strict=True):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_without_bias_and_with_frozen_inputs():
    hidden, weight, _, mask = _problem()
    w = weight.clone().requires_grad_()
    loss = fused_linear_mlc_loss(hidden, w, None, mask, impl="torch", chunk_size=2)
    loss.backward()
    ref_w = weight.clone().requires_grad_()
    mlc_loss(hidden @ ref_w.T, mask, impl="reference").backward()
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-9, atol=1e-11)


def test_gradcheck_torch_impl():
    hidden, weight, bias, mask = _problem(n=3, m=4, dh=5, d=3, seed=2)
    inputs = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b, reduction=reduction: fused_linear_mlc_loss(
                h, w, b, mask, impl="torch", objective="sv_softmax", tau=1.0, reduction=reduction, chunk_size=2
            ),
            inputs,
        )


def test_no_grad_forward_matches():
    hidden, weight, bias, mask = _problem()
    with torch.no_grad():
        loss = fused_linear_mlc_loss(hidden, weight, bias, mask, impl="native", chunk_size=4)
    torch.testing.assert_close(loss, mlc_loss(hidden @ weight.T + bias, mask, impl="reference"))


def test_autocast_mixed_dtypes_follow_torch():
    hidden, weight, bias, mask = _problem(dtype=torch.float32)
    hidden = hidden.bfloat16()
    with pytest.raises(TypeError, match="must share a dtype outside torch.autocast"):
        fused_linear_mlc_loss(hidden, weight, bias, mask)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_mlc_loss(h, w, b, mask, impl="torch", chunk_size=3)
        expected = mlc_loss(torch.nn.functional.linear(hidden, weight, bias), mask, impl="torch")
    loss.backward()
    assert loss.dtype == torch.float32
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-3)
    # the gradients against the unfused path under the same autocast, at the loss's tolerance
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused = mlc_loss(torch.nn.functional.linear(h2, w2, b2), mask, impl="torch")
    unfused.backward()
    for got, want in ((h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        assert got.dtype == want.dtype
        assert float(want.abs().max()) > 1e-3  # a gradient that a sign or scale bug would change
        # both paths multiply in bf16 under autocast (the unfused one also in its backward): bf16 resolution
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=2.0**-7 * float(want.abs().max()))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"weight": torch.randn(6, 11, dtype=torch.float64)}, ValueError, "weight must have shape \\(d, d_h\\)"),
        ({"bias": torch.randn(5, dtype=torch.float64)}, ValueError, "bias must have shape \\(d,\\) = \\(6,\\)"),
        ({"hidden": torch.randn(7, 12, dtype=torch.float64)}, ValueError, "hidden must have shape \\(N, m, d_h\\)"),
        ({"bias": torch.randn(6)}, TypeError, "must share a dtype"),
        ({"mask": torch.ones(7, 4, dtype=torch.bool)}, ValueError, "mask must have shape"),
        ({"hidden": torch.ones(7, 5, 12, dtype=torch.int32)}, TypeError, "hidden must be a float tensor"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"accum_dtype": torch.float32}, TypeError, "accum_dtype must be None, the weight's dtype"),
    ],
)
def test_bad_input(kwargs, exc, match):
    hidden, weight, bias, mask = _problem()
    args = {"hidden": hidden, "weight": weight, "bias": bias, "mask": mask, **kwargs}
    options = {k: args.pop(k) for k in ("chunk_size", "reduction", "accum_dtype") if k in args}
    with pytest.raises(exc, match=match):
        fused_linear_mlc_loss(args["hidden"], args["weight"], args["bias"], args["mask"], **options)


def test_module_and_head_loss():
    hidden, _, _, mask = _problem(dtype=torch.float32)
    head = MLCHead(12, 6)
    module = FusedLinearMLCLoss(impl="torch", chunk_size=2)
    direct = mlc_loss(head(hidden), mask, impl="torch")
    torch.testing.assert_close(module(hidden, head.weight, head.bias, mask), direct)
    torch.testing.assert_close(head.loss(hidden, mask, impl="torch"), direct)
    assert "impl='torch'" in repr(module)


def test_head_round_trip(tmp_path):
    head = MLCHead(12, 6)
    head.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "mlc_head.safetensors").is_file()
    loaded = MLCHead.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)
    no_bias = MLCHead(12, 6, bias=False)
    no_bias.save_pretrained(tmp_path / "nb")
    assert MLCHead.from_pretrained(tmp_path / "nb").bias is None


def test_head_refuses_mismatched_files(tmp_path):
    from safetensors.torch import save_file

    MLCHead(12, 6).save_pretrained(tmp_path)
    save_file({"weight": torch.zeros(6, 8), "bias": torch.zeros(6)}, str(tmp_path / "mlc_head.safetensors"))
    with pytest.raises(ValueError, match=r"weight .* has shape \(6, 8\), expected \(6, 12\)"):
        MLCHead.from_pretrained(tmp_path)
    save_file({"weight": torch.zeros(6, 12)}, str(tmp_path / "mlc_head.safetensors"))
    with pytest.raises(ValueError, match="holds \\['weight'\\], expected \\['bias', 'weight'\\]"):
        MLCHead.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MLCHead.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        MLCHead(0, 4)


def test_second_backward_of_the_same_graph_recomputes():
    hidden, weight, bias, mask = _problem()
    w = weight.clone().requires_grad_()
    loss = fused_linear_mlc_loss(hidden, w, bias, mask, impl="native", chunk_size=3)
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * first)


def test_chunked_path_reuses_one_workspace(monkeypatch):
    """Every chunk's representations live in the same preallocated buffer (one allocation per pass)."""
    import mlc_kernels.fused_linear as fl

    seen: list[int] = []
    real = fl.per_prompt_loss_and_grad

    def spy(name):
        fn = real(name)

        def wrapped(reps, *args):
            seen.append(reps.untyped_storage().data_ptr())
            return fn(reps, *args)

        return wrapped

    monkeypatch.setattr(fl, "per_prompt_loss_and_grad", spy)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 3, 8, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(5, 8, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    fl.fused_linear_mlc_loss(hidden, weight, bias, impl="torch", chunk_size=2).backward()
    assert len(seen) == 4 and len(set(seen)) == 1
    seen.clear()
    fl.fused_linear_mlc_loss(hidden, weight, bias, impl="torch", chunk_size=2, reduction="none").sum().backward()
    assert len(seen) == 4 and len(set(seen)) == 1  # the backward's recompute: its own single workspace


class _Allocations(TorchDispatchMode):
    """Records the shape and storage of every tensor an op creates (outputs not sharing an input's storage)."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[int, torch.dtype, int]] = []  # (numel, dtype, storage pointer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        seen = {t.untyped_storage().data_ptr() for t in flat_in}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen and t.numel() > 0:
                self.created.append((t.numel(), t.dtype, t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize(
    "dtype,accum_dtype,autocast,expected",
    [
        (torch.float32, None, False, {torch.float32: 1}),  # the accumulator handed back
        (torch.bfloat16, None, False, {torch.bfloat16: 1}),  # accumulates in the weight's dtype, as Liger
        (torch.bfloat16, torch.float32, False, {torch.float32: 1, torch.bfloat16: 1}),  # asked: fp32, one cast
        (torch.float32, None, True, {torch.float32: 1, torch.bfloat16: 1}),  # autocast's cast of w for the GEMMs
    ],
)
def test_gradients_accumulate_in_place_without_weight_sized_temporaries(dtype, accum_dtype, autocast, expected):
    """The weight gradient is summed in place into the buffer handed back, the input gradient written into its
    chunk's slice of one buffer: the only weight-sized tensors created are the accumulator (its final cast when
    ``accum_dtype`` differs) and, under autocast, the weight cast to the autocast dtype."""
    gen = torch.Generator().manual_seed(0)
    n, m, dh, d = 12, 3, 40, 24  # weight 960 elements, hidden 1440, a chunk at most 4 * 3 * 40 = 480
    hidden = torch.randn(n, m, dh, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(d, dh, generator=gen) / dh**0.5).to(dtype).requires_grad_()
    bias = torch.zeros(d, dtype=dtype).requires_grad_()
    mode = _Allocations()
    with mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused_linear_mlc_loss(hidden, weight, bias, impl="torch", chunk_size=4, accum_dtype=accum_dtype).backward()
    weight_sized: dict[torch.dtype, int] = {}
    for numel, dt, _ in mode.created:
        if numel == weight.numel():
            weight_sized[dt] = weight_sized.get(dt, 0) + 1
    assert weight_sized == expected
    hidden_sized = [ptr for numel, _, ptr in mode.created if numel == hidden.numel()]
    assert hidden_sized == [hidden.grad.untyped_storage().data_ptr()]  # one buffer, handed back as it is
    assert weight.grad.dtype == dtype and weight.grad.untyped_storage().data_ptr() in {p for *_, p in mode.created}


def test_accum_dtype_fp32_for_bf16_parameters():
    """bf16 parameters accumulate in bf16 by default (one rounding per chunk), in fp32 when asked: both near the fp64
    reference, the fp32 accumulator at least as near."""
    hidden, weight, bias, mask = _problem(n=24, seed=3)
    ref, ref_grads = _grads(lambda h, w, b: mlc_loss(h @ w.T + b, mask, impl="reference"), (hidden, weight, bias))
    errors = {}
    for accum in (None, torch.float32):
        _, grads = _grads(
            lambda h, w, b, accum=accum: fused_linear_mlc_loss(
                h, w, b, mask, impl="torch", chunk_size=2, accum_dtype=accum
            ),
            tuple(t.bfloat16() for t in (hidden, weight, bias)),
        )
        assert all(g.dtype == torch.bfloat16 for g in grads)
        errors[accum] = float((grads[1].double() - ref_grads[1]).abs().max() / ref_grads[1].abs().max())
    assert errors[torch.float32] <= errors[None] + 1e-3
    assert errors[None] < 0.1  # bf16 inputs: the loss kernel's own bf16 error dominates both


def test_default_chunk_policy_splits_every_batch(monkeypatch):
    """The default chunk is N split into a fixed number of chunks with a floor in rows, on every device: at the
    realistic training shape (64 prompts x 10 variants) it runs several chunks (a byte budget ran one)."""
    import mlc_kernels.fused_linear as fl

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for n, m in ((64, 10), (1024, 10), (8, 32), (300, 3)):
        for device, chunks in ((cpu, fl.DEFAULT_CHUNKS), (cuda, fl.CUDA_DEFAULT_CHUNKS)):
            per_chunk = fl.default_chunk_prompts(n, m, device)
            count = -(-n // per_chunk)
            assert 1 <= count <= chunks
            assert per_chunk * m >= fl.MIN_CHUNK_ROWS or per_chunk == n
            if n * m >= 2 * fl.MIN_CHUNK_ROWS:
                assert count >= 2
    assert -(-1024 // fl.default_chunk_prompts(1024, 10, cpu)) == fl.DEFAULT_CHUNKS
    calls: list[int] = []
    real = fl.per_prompt_loss_and_grad
    monkeypatch.setattr(
        fl, "per_prompt_loss_and_grad", lambda name: lambda reps, *a: calls.append(1) or real(name)(reps, *a)
    )
    hidden = torch.randn(64, 10, 8, requires_grad=True)
    fl.fused_linear_mlc_loss(hidden, torch.randn(4, 8), impl="torch").backward()
    assert len(calls) == -(-64 // fl.default_chunk_prompts(64, 10, cpu)) >= 4
