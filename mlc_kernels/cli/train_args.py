"""``mlc train``'s command line: TRL's ``TrlParser`` over mlc train's own options, the MLC options, the
algorithm's TRL config and TRL's ``ModelConfig``; ``--config FILE.yaml``, ``--recipe NAME`` as defaults, the
older spellings rewritten, and the checks that refuse a bad input before anything is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from ..ops.common import interpreting
from ..recipes import RECIPES, recipe
from ..sample_data import ALGORITHMS
from ..trainers import MLCArguments
from .options import HELP_FORMAT, check_output_folder, first_line, mlc_arguments_from, mlc_options_dataclass

TRAIN_DEFAULTS = dict(
    output_dir="mlc_train", per_device_train_batch_size=8, max_steps=100, learning_rate=5e-6, logging_steps=1,
    save_strategy="no", report_to="none", seed=0, logging_nan_inf_filter=False,
)  # fmt: skip
"""``mlc train``'s defaults where they differ from the TRL config's (the rest are TRL's)."""

TRAIN_ALIASES = {"--model": "--model_name_or_path", "--batch-size": "--per_device_train_batch_size"}


@dataclass
class TrainArguments:
    """``mlc train``'s own options (the model: ``--model``/``--model_name_or_path`` of TRL's ModelConfig)."""

    dataset: str = field(
        default="sample", metadata={"help": "JSONL file of records, LLaMA-Factory JSON (the MLC authors' "
                                            "multilingual_dpo/multilingual_sft; format in README), or 'sample'"}
    )  # fmt: skip
    dataset_format: str = field(
        default="auto", metadata={"help": "auto: a file starting with '[' is LLaMA-Factory JSON, else JSONL",
                                  "choices": ["auto", "jsonl", "llamafactory"]}
    )  # fmt: skip
    algorithm: str = field(
        default="dpo", metadata={"help": "alignment loss; choose it first: --help then lists its TRL options",
                                 "choices": list(ALGORITHMS)}
    )  # fmt: skip
    liger_kernels: bool = field(default=False, metadata={"help": "Liger's RMSNorm/RoPE/SwiGLU kernels (CUDA)"})
    recipe: str | None = field(
        default=None,
        metadata={"help": "a named set of training options applied as defaults ('paper': the MLC authors' DPO "
                          "recipe; README, 'Reproducing the paper'); --deepspeed none drops its ZeRO-2 config",
                  "choices": [None, *RECIPES]},
    )  # fmt: skip
    max_samples: int = field(default=0, metadata={"help": "train on the first N records only (0: all)"})


def _option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _is_option(argv: list[str], i: int, name: str) -> bool:
    """Whether ``argv[i]`` is ``name``, ``name=VALUE`` or the value right after ``name``."""
    arg = argv[i]
    return arg == name or arg.startswith(name + "=") or (i > 0 and argv[i - 1] == name)


def _yaml_config(argv: list[str]) -> dict:
    path = _option_value(argv, "--config")
    if path is None:
        return {}
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UsageError(f"--config {path}: cannot read it ({first_line(err)})") from err
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path}: not valid YAML ({first_line(err)})") from err
    if not isinstance(config, dict):
        raise UsageError(f"--config {path}: expected a YAML mapping option -> value")
    return config


def _rewrite_train_argv(argv: list[str]) -> list[str]:
    """The older spellings: ``--model``, ``--batch-size``, ``--no-generation-prompt``, ``--save-steps N``
    (N > 0 without ``--save_strategy``: save every N steps; 0: no intermediate checkpoint)."""
    out: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key in TRAIN_ALIASES:
            out.append(TRAIN_ALIASES[key] + eq + value)
        elif arg == "--no-generation-prompt":
            out += ["--mlc_generation_prompt", "false"]
        else:
            out.append(arg)
    save = _option_value(out, "--save-steps") or _option_value(out, "--save_steps")
    strategy = _option_value(out, "--save_strategy") or _option_value(out, "--save-strategy")
    if save is not None and strategy is None:
        out += ["--save_strategy", "steps" if save.strip() not in ("0", "0.0") else "no"]
        if save.strip() in ("0", "0.0"):
            out += ["--save_steps", "500"]
    return out


def train_parser(algorithm: str):
    """``TrlParser`` over (TrainArguments, MLC options, TRL's ModelConfig, the algorithm's TRL config), one ``--help``
    section each in that order (the few options a user sets first, TRL's 600 lines last)."""
    from trl import ModelConfig, TrlParser

    from ..trl_trainers import CONFIGS

    config_cls = CONFIGS[algorithm]
    mlc_options = mlc_options_dataclass()
    groups = ((TrainArguments, "mlc train: the data and the algorithm"), (mlc_options, "the MLC term (--mlc_*)"),
              (ModelConfig, "TRL's ModelConfig: the model (--model), LoRA (--use_peft), quantisation"),
              (config_cls, f"TRL's {config_cls.__name__}: training (TRL's and transformers' options)"))  # fmt: skip
    for cls, title in groups:  # HfArgumentParser: one --help section per dataclass, in this order
        cls._argument_group_name = title
    parser = TrlParser(
        tuple(cls for cls, _ in groups), prog="mlc train", formatter_class=HELP_FORMAT,
        usage="mlc train --model MODEL [--dataset DATASET] [--algorithm ALGORITHM] [--output-dir DIR] [options]",
        description=f"Train with {algorithm.upper()} + MLC. Options in four sections: mlc train's own (data, "
        f"algorithm), the MLC term (--mlc_*), TRL's ModelConfig (the model; LoRA: --use_peft), TRL's "
        f"{config_cls.__name__} (training). --config FILE.yaml sets any of them (command-line values win). --model "
        "is --model_name_or_path, --batch-size --per_device_train_batch_size.",
    )  # fmt: skip
    defaults = dict(TRAIN_DEFAULTS, use_cpu=not torch.cuda.is_available())
    if algorithm == "simpo":
        defaults.update(loss_type="simpo", cpo_alpha=0.0)
    parser.set_defaults(**defaults)
    parser.add_argument("--config", default=None, help="YAML file of options (like trl dpo --config)")
    return parser


def _usage_error(message: str):
    raise UsageError(message)


def _check_deepspeed_installed(deepspeed) -> None:
    """A DeepSpeed config needs the package; checked before the TRL config is built (transformers' own check
    there says "No package metadata was found for The 'deepspeed>=0.9.3' distribution was not found ...")."""
    import importlib.util

    from ..trainers import launched_with

    if (deepspeed or launched_with("DEEPSPEED")) and importlib.util.find_spec("deepspeed") is None:
        source = "--deepspeed" if deepspeed else "accelerate launch with a DeepSpeed config"
        raise UsageError(f"{source} needs the deepspeed package (pip install deepspeed)")


def parse_train_arguments(argv: list[str]):
    """``(TrainArguments, MLCArguments, TRL config, ModelConfig)`` of ``mlc train``'s command line."""
    argv = _rewrite_train_argv(argv)
    config = _yaml_config(argv)
    algorithm = _option_value(argv, "--algorithm") or config.get("algorithm", "dpo")
    if algorithm not in ALGORITHMS:
        raise UsageError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    deepspeed = _option_value(argv, "--deepspeed") or config.get("deepspeed")
    if (isinstance(deepspeed, str) and deepspeed.strip().lower() != "none" and not deepspeed.lstrip().startswith("{")
            and not Path(deepspeed).is_file()):  # fmt: skip
        # checked before the TRL config is built: a failed DeepSpeed setup there leaves transformers' global
        # DeepSpeed state half-made, which breaks model loading afterwards
        raise UsageError(f"--deepspeed must be a DeepSpeed JSON config file, {deepspeed} is not")
    parser = train_parser(algorithm)
    recipe_name = _option_value(argv, "--recipe") or config.get("recipe")
    no_deepspeed = isinstance(deepspeed, str) and deepspeed.strip().lower() == "none"
    if no_deepspeed:  # --deepspeed none: the recipe's ZeRO-2 config is not used
        argv = [a for i, a in enumerate(argv) if not _is_option(argv, i, "--deepspeed")]
    if recipe_name is not None:
        try:
            options = recipe(recipe_name)
        except ValueError as err:
            raise UsageError(str(err)) from err
        if no_deepspeed:
            options.pop("deepspeed")
        parser.set_defaults(**options)
        deepspeed = deepspeed if deepspeed is not None else options.get("deepspeed")
    _check_deepspeed_installed(None if no_deepspeed else deepspeed)
    parser.error = _usage_error  # one line, not argparse's usage of several hundred lines
    try:  # TrlParser reads --config FILE itself; the 5th output is the namespace of --config
        script, options, model_config, training = parser.parse_args_and_config(argv)[:4]
    except ValueError as err:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        raise UsageError(first_line(err).split(": ", 1)[-1]) from err
    return script, mlc_arguments_from(options), training, model_config


def check_training_numbers(training) -> None:
    """The TRL config's numbers that the trainer would refuse only after the model has loaded (or accept and
    misuse: ``max_steps`` 0 trains one step at learning rate 0, -5 trains for epochs)."""
    rate = training.learning_rate
    if not math.isfinite(rate) or rate < 0:
        raise UsageError(f"--learning_rate must be a finite number >= 0, got {rate}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(training, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(training, name)}")
    if training.max_steps == 0 or training.max_steps < -1:
        raise UsageError(f"--max_steps must be >= 1, or -1 (train for --num_train_epochs), got {training.max_steps}")
    if training.max_steps == -1 and not training.num_train_epochs > 0:
        raise UsageError(f"--num_train_epochs must be > 0 with --max_steps -1, got {training.num_train_epochs}")


def check_train_arguments(script: TrainArguments, training, model_config, mlc: MLCArguments | None = None) -> None:
    """Refuse a bad input before anything loads (one :class:`UsageError` naming the option)."""
    import importlib.util

    from ..mlc_term import check_distributed_setup

    if isinstance(script.max_samples, bool) or script.max_samples < 0:
        raise UsageError(f"--max_samples must be an int >= 0 (0: all records), got {script.max_samples}")
    if not model_config.model_name_or_path:
        raise UsageError("--model is required: a local model folder or a hub id")
    check_training_numbers(training)
    check_output_folder(training.output_dir, "--output_dir")
    deepspeed = training.deepspeed
    if isinstance(deepspeed, str) and not Path(deepspeed).is_file():
        raise UsageError(f"--deepspeed must be a DeepSpeed JSON config file, {deepspeed} is not")
    _check_deepspeed_installed(deepspeed)
    if mlc is not None:
        if mlc.impl == "triton" and not torch.cuda.is_available() and not interpreting():
            raise UsageError("--mlc_impl triton needs a CUDA device (none here); set TRITON_INTERPRET=1 to run "
                             "it on CPU through Triton's interpreter (slow), or use --mlc_impl torch (or auto)")
        if training.ddp_find_unused_parameters is True:
            try:
                check_distributed_setup(training, mlc)
            except ValueError as err:
                raise UsageError("--ddp_find_unused_parameters true " + str(err).split(" ", 1)[1]) from err
    resume = training.resume_from_checkpoint
    if resume not in (None, "last") and not Path(resume).is_dir():
        raise UsageError(f"--resume_from_checkpoint must be a checkpoint folder or 'last', got {resume}")
    for flag in ("load_in_4bit", "load_in_8bit"):
        if getattr(model_config, flag, False) and importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError(f"--{flag} needs the bitsandbytes package (pip install bitsandbytes; CUDA machines)")
    if script.liger_kernels:
        if not torch.cuda.is_available():
            raise UsageError("--liger-kernels needs a CUDA device (Liger's model kernels are GPU kernels)")
        if importlib.util.find_spec("liger_kernel") is None:
            raise UsageError("--liger-kernels needs liger-kernel (pip install liger-kernel)")
