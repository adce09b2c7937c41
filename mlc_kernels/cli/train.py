"""``mlc train``: a TRL trainer (DPO, ORPO, CPO, SimPO, SFT) with the MLC term on a model folder or hub id;
saves the model, the extractor (``mlc_head/``) and the training curves (``training.png``).

The command line is parsed by :mod:`.train_args` (TrlParser), not by the ``mlc`` parser."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from ..errors import UsageError
from ..sample_data import to_dataset
from .options import check_layer, load_model, load_tokenizer, resolve_model_path
from .train_args import check_train_arguments, parse_train_arguments


def make_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``train`` entry of ``mlc --help``; its options are TrlParser's (``mlc train --help``)."""
    return subparsers.add_parser("train", help="train with an alignment loss + MLC (mlc train --help: its options)",
                                 add_help=False)  # fmt: skip


def plot_training(log_history: list[dict], languages, path: Path) -> None:
    """Alignment loss, MLC loss and per-language cosine to consensus over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [e for e in log_history if "mlc/loss" in e]
    steps = [e["step"] for e in logs]
    fig, (ax_l, ax_c) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_l.plot(steps, [e.get("mlc/align_loss", float("nan")) for e in logs], label="alignment loss")
    ax_l.plot(steps, [e["mlc/loss"] for e in logs], label="MLC loss")
    ax_l.set_xlabel("step")
    ax_l.legend()
    for lang in languages:
        ax_c.plot(steps, [e.get(f"mlc/cos_{lang}", float("nan")) for e in logs], label=lang)
    ax_c.set_xlabel("step")
    ax_c.set_ylabel("cosine to consensus")
    ax_c.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def apply_liger_kernels(model) -> None:
    """Patch ``model`` with Liger-Kernel's Triton kernels (RMSNorm, RoPE, SwiGLU, ...) through its own patch
    function. CUDA only: Liger's kernels are GPU kernels; an explicit request elsewhere is refused."""
    if not torch.cuda.is_available():
        raise UsageError("--liger-kernels needs a CUDA device (Liger's model kernels are GPU kernels)")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as err:
        raise UsageError("--liger-kernels needs liger-kernel (pip install liger-kernel)") from err
    _apply_liger_kernel_to_instance(model=model)


def _model_kwargs(model_config) -> dict:
    from trl import get_quantization_config

    kwargs = {}
    dtype = getattr(model_config, "dtype", None)
    if dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, dtype)
    elif dtype == "auto":
        kwargs["dtype"] = "auto"
    if getattr(model_config, "attn_implementation", None):
        kwargs["attn_implementation"] = model_config.attn_implementation
    if getattr(model_config, "model_revision", None) not in (None, "main"):
        kwargs["revision"] = model_config.model_revision
    quantization = get_quantization_config(model_config)
    if quantization is not None:
        from accelerate import PartialState

        kwargs.update(quantization_config=quantization, device_map={"": PartialState().local_process_index})
    return kwargs


def main(argv: list[str]) -> None:
    """Run ``mlc train`` on its command line ``argv`` (what follows ``train``)."""
    import transformers
    from trl import get_peft_config

    from ..records import check_languages, load_checked
    from ..trainers import NonFiniteTrainingError
    from ..trl_trainers import TRAINERS

    script, mlc, training, model_config = parse_train_arguments(argv)
    check_train_arguments(script, training, model_config, mlc)
    records, where = load_checked(script.dataset, script.algorithm, "train" if script.dataset == "sample" else None,
                                  script.dataset_format)  # fmt: skip
    if script.max_samples:
        records, where = records[: script.max_samples], where[: script.max_samples]
    report = check_languages(records, where, mlc.languages, mlc.base_language)
    name, local = resolve_model_path(model_config.model_name_or_path)
    tokenizer = load_tokenizer(name, local)
    model = load_model(name, local, **_model_kwargs(model_config))
    check_layer(mlc, model)
    if script.liger_kernels:
        apply_liger_kernels(model)
    print(report)
    out = Path(training.output_dir)
    peft_config = get_peft_config(model_config)
    extra = {"peft_config": peft_config} if peft_config is not None else {}
    if script.algorithm == "dpo" and peft_config is None:
        extra["ref_model"] = copy.deepcopy(model)
    dataset = to_dataset(records, script.algorithm, mlc.languages, mlc.base_language)
    trainer = TRAINERS[script.algorithm](
        model=model, args=training, train_dataset=dataset, processing_class=tokenizer, mlc_args=mlc, **extra
    )
    resume = training.resume_from_checkpoint
    if resume == "last":
        resume = transformers.trainer_utils.get_last_checkpoint(str(out)) if out.is_dir() else None
        if resume is None:
            raise UsageError(f"--resume_from_checkpoint last: no checkpoint-* folder in {out}")
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteTrainingError as err:
        raise UsageError(f"{err} (--output_dir {out})") from err
    trainer.save_model(str(out))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(out))
        plot_training(trainer.state.log_history, mlc.languages, out / "training.png")
        kind = "LoRA adapters" if peft_config is not None else "checkpoint"
        print(f"mlc train: {kind} and extractor (mlc_head/) in {out}; curves in {out / 'training.png'}")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # under torchrun/accelerate launch: destroy the process group cleanly
