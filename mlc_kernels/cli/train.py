"""``mlc train``: a TRL trainer (DPO, ORPO, CPO, SimPO, SFT) with the MLC term on a model folder or hub id;
saves the model, the extractor (``mlc_head/``) and the training curves (``training.png``).

The command line is parsed by :mod:`.train_args` (TrlParser), not by the ``mlc`` parser."""

from __future__ import annotations

import argparse
import copy
import logging
import re
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


def training_figure(log_history: list[dict], languages):
    """The figure of ``training.png``: the losses (left) and each language's cosine to the consensus direction
    (right) over the optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [e for e in log_history if "mlc/loss" in e]
    steps = [e["step"] for e in logs]
    fig, (ax_l, ax_c) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_l.plot(steps, [e.get("mlc/align_loss", float("nan")) for e in logs], label="alignment loss")
    ax_l.plot(steps, [e["mlc/loss"] for e in logs], label="MLC loss")
    ax_l.set_title("losses")
    ax_l.set_xlabel("optimizer step")
    ax_l.set_ylabel("loss (nats per prompt)")
    ax_l.legend()
    for lang in languages:
        ax_c.plot(steps, [e.get(f"mlc/cos_{lang}", float("nan")) for e in logs], label=lang)
    ax_c.set_title("agreement with the consensus direction")
    ax_c.set_xlabel("optimizer step")
    ax_c.set_ylabel("cosine to consensus (1 = agrees)")
    for ax in (ax_l, ax_c):
        ax.ticklabel_format(axis="y", useOffset=False)  # values like 1 - 1e-7 read as such, not "1e-7+1"
    ax_c.legend(fontsize=7, ncol=2)
    fig.suptitle("mlc train: training curves")
    fig.tight_layout()
    return fig


def plot_training(log_history: list[dict], languages, path: Path) -> None:
    """Write :func:`training_figure` to ``path``."""
    import matplotlib.pyplot as plt

    fig = training_figure(log_history, languages)
    fig.savefig(path, dpi=120)
    plt.close(fig)


LOG_KEYS = (("loss", "loss"), ("mlc/loss", "MLC loss"), ("mlc/s1_share", "s1 share"), ("learning_rate", "lr"))
"""What a logging step prints (label, key); every metric stays in the trainer's log history and ``training.png``."""


def compact_log_line(logs: dict, state) -> str:
    """One short line for a logging step (the trainer prints a dict of 25 keys)."""
    if "train_runtime" in logs:
        seconds, loss = logs["train_runtime"], logs.get("train_loss", float("nan"))
        return f"done: {state.global_step} steps in {seconds:.0f} s, mean loss {loss:.4g}"
    parts = [f"{label} {logs[key]:.4g}" for key, label in LOG_KEYS if isinstance(logs.get(key), (int, float))]
    return f"step {state.global_step}/{state.max_steps}: " + ", ".join(parts)


def compact_logging(trainer) -> None:
    """Replace the trainer's per-step dict (progress bar or printer) with :func:`compact_log_line`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class CompactProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None:
                self.training_bar.write(compact_log_line(logs or {}, state))

    class CompactPrinter(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                print(compact_log_line(logs or {}, state))

    for old, new in ((ProgressCallback, CompactProgress), (PrinterCallback, CompactPrinter)):
        if trainer.pop_callback(old) is not None:
            trainer.add_callback(new)


class _TiedKeysNote(logging.Filter):
    """On resume, transformers warns "There were missing keys in the checkpoint model loaded: ['lm_head.weight']"
    for a model whose output layer is tied to its input embeddings (saved once): drop that warning when every
    missing key is a tied copy of a loaded weight."""

    def __init__(self, model) -> None:
        super().__init__()
        pointers: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            pointers.setdefault(param.data_ptr(), []).append(name)
        self.tied = {name for names in pointers.values() if len(names) > 1 for name in names}

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if not text.startswith("There were missing keys in the checkpoint model loaded: "):
            return True
        missing = re.findall(r"'([^']+)'", text)
        return not (missing and all(_unwrapped(key) in self.tied for key in missing))


def _unwrapped(key: str) -> str:
    return key.removeprefix("module.")


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

    from ..mlc_term import check_tokenisation
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
    check_tokenisation(records, where, tokenizer, mlc)  # before the model loads
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
    compact_logging(trainer)
    note = _TiedKeysNote(trainer.model)
    logging.getLogger("transformers.trainer").addFilter(note)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteTrainingError as err:
        raise UsageError(f"{err} (--output_dir {out})") from err
    finally:
        logging.getLogger("transformers.trainer").removeFilter(note)
    trainer.save_model(str(out))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(out))
        plot_training(trainer.state.log_history, mlc.languages, out / "training.png")
        kind = "LoRA adapters" if peft_config is not None else "checkpoint"
        print(f"mlc train: {kind} and extractor (mlc_head/) in {out}; curves in {out / 'training.png'}")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # under torchrun/accelerate launch: destroy the process group cleanly
