"""The implementation registry, refusals, torch.compile, meta tensors and the native build folder."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import sys
import time

import pytest
import torch
from helpers import general_position, random_mask

import mlc_kernels.loss
from mlc_kernels import ImplementationUnavailableError, mlc_loss
from mlc_kernels.ops import REGISTRY, common, per_prompt_loss, per_prompt_loss_and_grad, resolve_impl
from mlc_kernels.ops import native as native_mod
from mlc_kernels.ops.common import OBJECTIVES
from mlc_kernels.ops.reference import _dense_reference_mlc_loss, _reference_mlc_loss
from mlc_kernels.trainers import MLCArguments

CPU_IMPLS = ("auto", "reference", "torch", "native")


# -- one source --------------------------------------------------------------------------------


def test_names_come_from_the_registry():
    assert mlc_kernels.loss.IMPLEMENTATIONS == ("auto", *REGISTRY)
    assert set(REGISTRY) == {"reference", "torch", "native", "triton"}
    for name, impl in REGISTRY.items():
        assert impl.name == name
        assert per_prompt_loss(name) is impl.loss_fn
        assert per_prompt_loss_and_grad(name) is impl.loss_and_grad_fn
    with pytest.raises(ValueError, match="unknown implementation 'auto'"):
        per_prompt_loss("auto")


def test_triton_limit_is_the_kernels_constant():
    from mlc_kernels.ops.triton import MAX_VARIANTS, launch

    assert REGISTRY["triton"].max_variants == MAX_VARIANTS == common.MAX_VARIANTS
    assert launch.interpreting is common.interpreting


def test_mlc_arguments_and_cli_choices_come_from_the_registry():
    field = next(f for f in dataclasses.fields(MLCArguments) if f.name == "impl")
    assert tuple(field.metadata["choices"]) == mlc_kernels.loss.IMPLEMENTATIONS
    with pytest.raises(ValueError, match=re.escape(f"must be one of {mlc_kernels.loss.IMPLEMENTATIONS}")):
        MLCArguments(impl="cuda")
    pytest.importorskip("trl")
    from mlc_kernels.cli.train_args import train_parser

    action = next(a for a in train_parser("dpo")._actions if "--mlc_impl" in a.option_strings)
    assert tuple(action.choices) == mlc_kernels.loss.IMPLEMENTATIONS


def test_unknown_impl_lists_the_registry():
    with pytest.raises(ValueError, match=re.escape(str(("auto", *REGISTRY)))):
        mlc_loss(torch.randn(2, 3, 4), impl="fast")


# -- explicit impls refuse, naming the argument; auto picks ----------------------------------------


def test_explicit_refusals_name_the_argument(monkeypatch):
    with pytest.raises(TypeError, match="impl='triton' takes reps in float32, bfloat16 or float16, got torch.float64"):
        mlc_loss(torch.randn(2, 3, 4, dtype=torch.float64), impl="triton")
    with pytest.raises(ValueError, match=r"at most 32 variants per prompt \(reps.shape\[1\]\), got 33"):
        mlc_loss(torch.randn(2, 33, 4), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        ImplementationUnavailableError, match="impl='triton' needs reps on cuda or meta, got reps on cpu"
    ):
        mlc_loss(torch.randn(2, 3, 4), impl="triton")


def test_native_refuses_other_devices():
    cpu_only = dataclasses.replace(REGISTRY["native"], devices=("cpu",))  # meta stands in for a GPU here
    with pytest.raises(ImplementationUnavailableError, match="impl='native' needs reps on cpu, got reps on meta"):
        cpu_only.check(torch.empty(2, 3, 4, device="meta"))


@pytest.mark.gpu
def test_native_refuses_cuda():
    with pytest.raises(
        ImplementationUnavailableError, match="impl='native' needs reps on cpu or meta, got reps on cuda"
    ):
        mlc_loss(torch.randn(2, 3, 4, device="cuda"), impl="native")


def test_auto_choices():
    assert resolve_impl("auto", torch.randn(2, 3, 4)) == "native"
    assert resolve_impl("auto", torch.empty(2, 3, 4, device="meta")) == "torch"  # meta: no real device to pick for
    for name in REGISTRY:
        assert resolve_impl(name, torch.randn(2, 3, 4)) == name


# -- torch.compile ----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_compile_fullgraph_on_cpu(impl):
    torch._dynamo.reset()
    reps = general_position(3, 5, 8, seed=5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False  # one prompt with a single variant

    def step(x, mask):
        return mlc_loss(x, mask, impl=impl, objective="sv_softmax", tau=1.0) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = reps.clone().requires_grad_(), reps.clone().requires_grad_()
    eager = step(x1, mask)
    eager.backward()
    out = compiled(x2, mask)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x2.grad, x1.grad)
    with torch.no_grad():  # the loss-only graph (no gradient written)
        torch.testing.assert_close(compiled(reps, mask), eager.detach())


@pytest.mark.parametrize("impl", ["auto", "native"])
def test_compile_before_the_first_build(monkeypatch, impl):
    # the build and its lock run outside the traced graph, even when compile comes first
    torch._dynamo.reset()
    assert native_mod.native_error() is None  # load the library; then forget that it was built
    monkeypatch.setattr(native_mod, "_state", {})
    monkeypatch.setattr(native_mod, "_build", lambda: None)  # the library is loaded already in this process
    reps = general_position(2, 3, 8, seed=1)
    compiled = torch.compile(lambda x: mlc_loss(x, impl=impl), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(reps), mlc_loss(reps, impl="native"))
    assert native_mod._state["error"] is None


def test_fake_kernel_never_builds(monkeypatch):
    def refuse():
        raise AssertionError("the fake kernel must not build")

    monkeypatch.setattr(native_mod, "_build", refuse)
    monkeypatch.setattr(native_mod, "_state", {})
    x = torch.empty(4, 3, 8, device="meta", requires_grad=True)
    mlc_loss(x, impl="native").backward()
    assert x.grad.shape == x.shape and "error" not in native_mod._state


# -- meta tensors -----------------------------------------------------------------------------------

META_CASES = [
    (impl, dtype)
    for impl, dtype in itertools.product(("auto", *REGISTRY), (torch.float32, torch.float64, torch.bfloat16))
    if not (impl == "triton" and dtype == torch.float64)
]


@pytest.mark.parametrize("impl,dtype", META_CASES)
def test_meta_tensors_through_every_impl(impl, dtype):
    x = torch.empty(4, 3, 8, device="meta", dtype=dtype, requires_grad=True)
    mask = torch.ones(4, 3, dtype=torch.bool, device="meta")
    loss = mlc_loss(x, mask, impl=impl)
    assert loss.device.type == "meta" and loss.shape == ()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape and x.grad.dtype == dtype
    per_prompt = mlc_loss(x.detach(), mask, impl=impl, reduction="none")
    assert per_prompt.shape == (4,)
    if impl != "auto":
        loss_n, grad = per_prompt_loss_and_grad(impl)(x.detach(), mask, 1.0, "sv_softmax")
        assert loss_n.shape == (4,) and grad.shape == x.shape


# -- the reference's dense form (compile, meta) equals its grouped form ------------------------------


@pytest.mark.parametrize("d", [8, 3])
def test_dense_reference_matches_grouped(d):
    reps = general_position(6, 5, d, seed=1)
    mask = random_mask(6, 5, seed=2)
    mask[0] = True
    mask[1] = False
    mask[2, 1:] = False
    weights = torch.arange(1.0, 7.0, dtype=torch.float64)
    for objective, anchor in itertools.product(OBJECTIVES, (False, True)):
        results = []
        for fn in (_reference_mlc_loss, _dense_reference_mlc_loss):
            x = reps.clone().requires_grad_()
            loss = fn(x, mask, 0.7, objective, anchor)
            (loss * weights).sum().backward()
            results.append((loss.detach(), x.grad))
        torch.testing.assert_close(results[1][0], results[0][0], msg=f"{objective} anchor={anchor}")
        torch.testing.assert_close(results[1][1], results[0][1], msg=f"{objective} anchor={anchor}")


# -- the native build folder -------------------------------------------------------------------------


def test_extension_name_hashes_source_and_torch_version():
    name = native_mod.extension_name("int x;", "2.13.0")
    assert re.fullmatch(r"mlc_native_[0-9a-f]{8}", name)
    assert native_mod.extension_name("int x;", "2.13.0") == name
    assert native_mod.extension_name("int y;", "2.13.0") != name
    assert native_mod.extension_name("int x;", "2.14.0") != name


def test_build_uses_the_hashed_name_and_says_so(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as cpp

    source = tmp_path / "mlc_native.cpp"
    source.write_text("// version 1")
    calls = []
    monkeypatch.setattr(native_mod, "SOURCE", source)
    monkeypatch.setattr(cpp, "load", lambda **kw: calls.append(kw["name"]))
    monkeypatch.setattr(cpp, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    native_mod._build()
    source.write_text("// version 2")
    native_mod._build()
    assert calls == [native_mod.extension_name("// version 1"), native_mod.extension_name("// version 2")]
    assert calls[0] != calls[1]
    assert capsys.readouterr().err.count(native_mod.BUILD_MESSAGE) == 2
    (tmp_path / calls[1]).mkdir()
    (tmp_path / calls[1] / f"{calls[1]}.so").write_text("")
    native_mod._build()  # built already: no message
    assert native_mod.BUILD_MESSAGE not in capsys.readouterr().err


def test_every_build_input_keys_its_own_folder(monkeypatch):
    environment = native_mod.build_environment()
    assert {"cflags", "compiler", "python", "prefix", "torch", "source"} <= set(environment)
    name = native_mod.extension_name("int x;", "2.13.0", environment)
    names = {native_mod.extension_name("int x;", "2.13.0", {**environment, key: value + "x"})
             for key, value in environment.items()}  # fmt: skip
    assert name not in names and len(names) == len(environment)  # each input: a folder of its own
    assert native_mod.extension_name("int x;", "2.13.0") == name  # the default: this process's environment
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert native_mod.build_environment()["prefix"] == "/some/other/venv"
    assert native_mod.extension_name("int x;", "2.13.0") != name
    monkeypatch.setattr(native_mod, "EXTRA_CFLAGS", ("-O2",))
    assert native_mod.build_environment()["cflags"] == "-O2"


def test_two_environments_sharing_the_extensions_folder_keep_their_builds(monkeypatch, tmp_path, capsys):
    """Issue 20, finding 10: two venvs with the same source and torch rebuilt one folder in turn, silently."""
    import torch.utils.cpp_extension as cpp

    source = tmp_path / "mlc_native.cpp"
    source.write_text("// the kernel")
    builds = []

    def load(name, **kwargs):  # as torch's: builds (ninja) when the library is missing or older than the source
        library = tmp_path / name / f"{name}.so"
        if library.exists() and library.stat().st_mtime >= source.stat().st_mtime:
            return
        builds.append((name, capsys.readouterr().err))  # what was said before the build started
        library.parent.mkdir(exist_ok=True)
        library.write_text("")
        os.utime(library, (source.stat().st_mtime + 1,) * 2)

    monkeypatch.setattr(native_mod, "SOURCE", source)
    monkeypatch.setattr(cpp, "load", load)
    monkeypatch.setattr(cpp, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    for prefix in ("/envs/a", "/envs/b", "/envs/a", "/envs/b"):
        monkeypatch.setattr(sys, "prefix", prefix)
        native_mod._build()
    assert len(builds) == 2 and builds[0][0] != builds[1][0]  # one build each, in its own folder
    for name, err in builds:
        assert err.strip() == f"{native_mod.BUILD_MESSAGE} ({name})"  # one line, before the build
    assert capsys.readouterr().err == ""  # the later loads found their builds: no line
    os.utime(source, (time.time() + 10, time.time() + 10))  # the source changed: ninja rebuilds, and says so
    native_mod._build()
    assert len(builds) == 3 and builds[2][1].strip() == f"{native_mod.BUILD_MESSAGE} ({builds[1][0]})"


def test_triton_op_implementations_answer_meta_tensors():
    """torch 2.11 registers a ``triton_op``'s implementation as its Meta kernel (``register_fake``), so the
    implementation itself must answer meta tensors without launching (the H200 run failed at import there)."""
    from mlc_kernels.ops.triton import op

    forward, grad_fn = op.mlc_forward._abstract_fn, op.mlc_grad._abstract_fn  # the implementations as registered
    x = torch.empty(4, 10, 32, device="meta", dtype=torch.bfloat16)
    loss, bmat = forward(x, None, 0.2, 0, False, True)
    assert loss.shape == (4,) and loss.dtype == torch.float32 and bmat.shape == (4, 16, 16)
    assert forward(x, None, 0.2, 0, False, False)[1].shape == (0, 16, 16)
    grad = grad_fn(x, None, bmat, torch.empty(4, device="meta"))
    assert grad.shape == x.shape and grad.dtype == x.dtype


def test_meta_registration_tolerates_one_already_there():
    from mlc_kernels.ops.triton import op

    class AlreadyThere:
        def register_kernel(self, key):
            raise RuntimeError("This is not allowed since there's already a kernel registered from python")

    class Broken:
        def register_kernel(self, key):
            raise RuntimeError("something else")

    op._register_meta(AlreadyThere(), op._forward_meta)
    with pytest.raises(RuntimeError, match="something else"):
        op._register_meta(Broken(), op._forward_meta)
