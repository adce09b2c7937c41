"""MLC training beyond one process, on the CPU with gloo: DDP through the TRL trainer (2 processes via torchrun,
with and without gradient accumulation), FSDP2 (``fully_shard``, the engine of accelerate's FSDP2), resume
from a checkpoint, the shipped accelerate configs and the errors of bad setups."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from trl_fixtures import LANGS, records, tiny_model, tiny_tokenizer  # noqa: E402

from mlc_kernels.trainers import MLCArguments, trl_classes  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"
ROOT = Path(__file__).parent.parent


def run_processes(processes: int, *command: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python *command`` on ``processes`` CPU processes (torchrun --standalone for more than one), or on
    the GPU under ``launcher`` (e.g. ``accelerate launch ...``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter aborts torchrun
    if launcher is None and "--device" not in command:
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo processes on the CPU, also on a GPU machine
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if launcher is not None:
        cmd = [*launcher, *command]
    elif processes == 1:
        cmd = [sys.executable, *command]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc_per_node={processes}", *command]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def launch(tmp_path: Path, name: str, processes: int, *args: str, launcher: list[str] | None = None) -> dict:
    """Run the worker on ``processes`` CPU processes; returns rank 0's result."""
    out = tmp_path / f"{name}.pt"
    output_dir = [] if "--output-dir" in args else ["--output-dir", str(tmp_path / name)]
    run_processes(processes, str(WORKER), *args, "--out", str(out), *output_dir, launcher=launcher)
    result = torch.load(out)
    assert result["world"] == processes
    return result


def assert_same_step(got: dict, want: dict) -> None:
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert set(got["grads"]) == set(want["grads"])
    assert any(name.startswith("mlc_head.") for name in want["grads"]), "the extractor has no gradient"
    for name, grad in want["grads"].items():
        scale = grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got["grads"][name] / scale, grad / scale, rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def single_process_step(tmp_path_factory) -> dict:
    return launch(tmp_path_factory.mktemp("single"), "single", 1, "trainer", "--per-device", "4")


@pytest.mark.parametrize("per_device,accumulation,grad_cache", [(2, 1, False), (1, 2, False), (1, 2, True)])
def test_ddp_step_equals_one_process_on_the_full_batch(
    single_process_step, tmp_path, per_device, accumulation, grad_cache
):
    """2 processes x per_device x accumulation = the same 4 prompts; the processes hold 2 and 1 MLC-eligible
    prompts (1 and 1, 1 and 0 per micro-batch), so only the global-batch mean reproduces the gradients. The
    gradient cache (its MLC backward runs before the DDP forward) must give the same step."""
    extra = ["--grad-cache"] if grad_cache else []
    got = launch(tmp_path, "ddp", 2, "trainer", "--per-device", str(per_device), "--accumulation", str(accumulation),
                 *extra)  # fmt: skip
    assert_same_step(got, single_process_step)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_step_equals_one_process_on_the_full_batch(single_process_step, tmp_path, stage):
    """The shipped ZeRO-2/3 configs on 2 CPU processes (DeepSpeed's CPU accelerator, gloo): ZeRO-3 partitions the
    extractor too and gathers it around its forward, where the fused loss runs."""
    pytest.importorskip("deepspeed")
    config = str(ROOT / "integrations" / "deepspeed" / f"zero{stage}.json")
    got = launch(tmp_path, f"zero{stage}", 2, "trainer", "--per-device", "2", "--deepspeed", config)
    assert got["engine"] == "DEEPSPEED"
    assert_same_step(got, single_process_step)


def test_fsdp2_truncated_passes_and_extractor_match_one_process(tmp_path):
    want = launch(tmp_path, "fsdp_single", 1, "fsdp2")
    got = launch(tmp_path, "fsdp", 2, "fsdp2")
    assert_same_step(got, want)


@pytest.mark.gpu
def test_fsdp2_through_accelerate_on_one_gpu(tmp_path):
    """The shipped FSDP2 config through ``accelerate launch`` (1 GPU: the multi-GPU runs are the CPU tests
    above): the trainer step equals plain single-GPU training, and the extractor is its own FSDP unit."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "integrations" / "accelerate" / "fsdp2.yaml"), "--num_processes", "1",
                "--mixed_precision", "no"]  # fmt: skip
    want = launch(tmp_path, "gpu_single", 1, "trainer", "--device", "cuda")
    got = launch(tmp_path, "gpu_fsdp2", 1, "trainer", "--device", "cuda", launcher=launcher)
    assert want["engine"] == "NO" and got["engine"] == "FSDP"
    assert got["head_class"].startswith("FSDP"), got["head_class"]
    assert_same_step(got, want)


def test_mlc_train_runs_unchanged_on_two_processes(tmp_path):
    """The ``mlc train`` command under torchrun (what ``accelerate launch`` runs for DDP): DPO + MLC on the
    embedded sample, 2 processes, gradient accumulation 2, a checkpoint with the extractor."""
    from mlc_kernels.fixtures import demo_model_and_tokenizer

    model, tokenizer = demo_model_and_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    proc = run_processes(2, "-m", "mlc_kernels.cli", "train", "--model", str(tmp_path / "model"), "--output-dir",
                         str(out), "--max-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps", "2",
                         "--save-steps", "2", "--languages", "en,zh,ru", "--mlc-layer", "2", "--mlc-rep-size", "8",
                         "--mlc-impl", "torch")  # fmt: skip
    assert proc.stdout.count("mlc train: checkpoint and extractor") == 1  # printed by the main process only
    state = (out / "checkpoint-2" / "trainer_state.json").read_text()
    assert '"mlc/loss"' in state and '"global_step": 2' in state
    assert (out / "mlc_head" / "mlc_head.safetensors").is_file()


def test_ddp_resume_continues_exactly(tmp_path):
    """2 processes, shuffled data: 6 steps straight == 3 steps, stop, resume from the checkpoint (each process's
    RNG state, the data position, optimizer and scheduler), 3 more; the run crosses an epoch boundary."""
    common = ["trainer", "--shuffle", "--per-device", "1", "--max-steps", "6"]
    straight = launch(tmp_path, "straight", 2, *common)
    run = ["--save-steps", "3", "--output-dir", str(tmp_path / "run")]
    first = launch(tmp_path, "first", 2, *common, *run, "--stop-at", "3")
    assert first["step"] == 3 and (tmp_path / "run" / "checkpoint-3" / "rng_state_1.pth").is_file()
    resumed = launch(tmp_path, "resumed", 2, *common, *run, "--resume", str(tmp_path / "run" / "checkpoint-3"))
    assert resumed["step"] == 6 and resumed["losses"] == straight["losses"]  # steps 1-3 from the checkpoint's log
    for name, weight in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


def _dpo_trainer(out: Path, *, steps: int, save_steps: int | None = None, callbacks=()):
    trainer_cls, config_cls = trl_classes("dpo")
    tokenizer = tiny_tokenizer()
    config = config_cls(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=3,
        data_seed=3, use_cpu=True, bf16=False, max_length=32, full_determinism=True, disable_tqdm=True,
    )  # fmt: skip
    return trainer_cls(
        model=tiny_model(len(tokenizer)), ref_model=tiny_model(len(tokenizer)), args=config,
        processing_class=tokenizer, train_dataset=records("dpo", missing_zh=(2,)),
        mlc_args=MLCArguments(languages=LANGS, weight=1.0, layer=2, rep_size=8, impl="torch"),
        callbacks=list(callbacks),
    )  # fmt: skip


def test_resume_continues_exactly(tmp_path):
    """6 steps straight == 3 steps, stop, resume from the checkpoint, 3 more (8 records, 2 per step: the
    resumed run crosses an epoch boundary, so the shuffled order of epoch 2 must be restored too)."""
    straight = _dpo_trainer(tmp_path / "straight", steps=6)
    straight.train()

    class StopAtThree(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    first = _dpo_trainer(tmp_path / "run", steps=6, save_steps=3, callbacks=[StopAtThree()])
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "mlc_head" / "mlc_head.safetensors").is_file()
    assert first.state.global_step == 3
    resumed = _dpo_trainer(tmp_path / "run", steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    want = dict(straight.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, want[name]), name
    initial = _dpo_trainer(tmp_path / "init", steps=1).model.mlc_head.weight
    assert not torch.equal(resumed.model.mlc_head.weight, initial)  # the extractor was trained, saved, restored
    losses = [log["loss"] for log in straight.state.log_history if "loss" in log]
    resumed_losses = [log["loss"] for log in resumed.state.log_history if "loss" in log]
    assert resumed_losses[-3:] == losses[-3:]


def test_checkpoint_writes_the_extractor_from_the_gathered_state_dict(tmp_path):
    """Under FSDP/DeepSpeed the trainer's ``_save`` gets the engine's full state dict: the extractor folder is
    written from it, not from the (sharded) module."""
    from mlc_kernels import MLCHead

    trainer = _dpo_trainer(tmp_path / "save", steps=1)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state["mlc_head.weight"] = torch.full_like(state["mlc_head.weight"], 0.5)
    want = {k: v for k, v in state.items() if k.startswith("mlc_head.")}
    trainer._save(str(tmp_path / "ckpt"), state_dict=state)
    head = MLCHead.from_pretrained(tmp_path / "ckpt" / "mlc_head")
    assert torch.equal(head.weight, want["mlc_head.weight"])
    assert torch.equal(head.bias, want["mlc_head.bias"])
    with pytest.raises(ValueError, match=r"holds \['weight'\], expected \['weight', 'bias'\]"):
        head.save_pretrained(tmp_path / "bad", state_dict={"weight": head.weight})


def test_find_unused_parameters_is_refused_and_defaulted_off(tmp_path):
    trainer = _dpo_trainer(tmp_path / "default", steps=1)
    assert trainer.args.ddp_find_unused_parameters is False
    trainer_cls, config_cls = trl_classes("dpo")
    config = config_cls(output_dir=str(tmp_path / "x"), use_cpu=True, ddp_find_unused_parameters=True, report_to=[])
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="ddp_find_unused_parameters"):
        trainer_cls(model=tiny_model(len(tokenizer)), args=config, processing_class=tokenizer,
                    train_dataset=records("dpo"), mlc_args=MLCArguments(languages=LANGS))  # fmt: skip


def test_variants_split_across_processes_are_refused(tmp_path):
    trainer = _dpo_trainer(tmp_path / "split", steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    for key in ("mlc_input_ids", "mlc_attention_mask", "mlc_mask"):
        batch[key] = batch[key][:, :2]  # what a split of the variant axis over 2 processes would leave
    with pytest.raises(ValueError, match="split across processes"):
        trainer.compute_loss(trainer.model, batch)


def test_gradient_cache_refuses_fsdp_with_several_processes(tmp_path, monkeypatch):
    trainer_cls, config_cls = trl_classes("dpo")
    monkeypatch.setattr(config_cls, "world_size", property(lambda self: 2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = config_cls(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="grad_cache"):
        trainer_cls(model=tiny_model(len(tokenizer)), args=config, processing_class=tokenizer,
                    train_dataset=records("dpo"), mlc_args=MLCArguments(languages=LANGS, grad_cache=True))  # fmt: skip


CONFIGS = {
    "ddp.yaml": {"distributed_type": "MULTI_GPU"},
    "fsdp2.yaml": {"distributed_type": "FSDP"},
    "deepspeed_zero2.yaml": {"distributed_type": "DEEPSPEED"},
    "deepspeed_zero3.yaml": {"distributed_type": "DEEPSPEED"},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "integrations" / "accelerate" / name))
    assert config.distributed_type.value == CONFIGS[name]["distributed_type"]
    if name == "fsdp2.yaml":
        assert str(config.fsdp_config["fsdp_version"]) == "2"
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-6])


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs(stage):
    import json

    config = json.loads((ROOT / "integrations" / "deepspeed" / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # filled in by the trainer from its arguments
