"""``mlc``: train with MLC (TRL trainers), evaluate cross-lingual consistency, and the offline demo.

- ``mlc train``: model (local path or hub id), dataset (JSONL or ``sample``), algorithm, MLC options.
- ``mlc eval``: per-language consistency with the consensus direction and the s1 share, printed and plotted.
- ``mlc demo``: no arguments, no network: a mini Qwen2-style model from a config (random init), eval,
  DPO+MLC on the embedded sample set, eval again, before/after report and PNG plots.
- ``mlc bench``: the kernel benchmarks (same as ``mlc-bench``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UsageError
from .recipes import RECIPES, recipe
from .sample_data import ALGORITHMS, LANGUAGES, to_dataset
from .trainers import MLCArguments


@torch.no_grad()
def evaluate(model, tokenizer, records, mlc: MLCArguments, head=None) -> dict:
    """Per-language mean cosine to the prompt's consensus direction, mean s1 share and between-prompt cosine."""
    from .metrics import consistency_metrics
    from .trainers import record_variant_states

    layer = mlc.check(model)
    was_training = model.training
    model.eval()
    reps, mask = record_variant_states(model, tokenizer, records, mlc, layer)
    model.train(was_training)
    if head is not None:
        reps = head.to(reps.device)(reps)
    stats = consistency_metrics(reps.float(), mask)
    per_lang = {}
    for j, lang in enumerate(mlc.languages):
        cos = stats["cosine_to_consensus"][:, j]
        cos = cos[~torch.isnan(cos)]
        per_lang[lang] = cos.mean().item() if cos.numel() else float("nan")
    valid = stats["valid"]
    return {
        "cosine_to_consensus": per_lang,
        "s1_share": stats["s1_share"][valid].mean().item(),
        "between_prompt_cosine": float(stats["between_prompt_cosine"]),
        "layer": layer,
    }


def format_eval(results: dict[str, dict]) -> str:
    """A table: one row per language (mean cosine of the variant to its prompt's consensus direction), then
    the mean s1 share and the between-prompt cosine; one column per result set (e.g. before / after)."""
    names = list(results)
    langs = list(next(iter(results.values()))["cosine_to_consensus"])

    def cell(value) -> str:
        return f"{value:>12.4f}" if value is not None and value == value else f"{'n/a':>12}"

    lines = [f"{'row':<24}" + "".join(f"{n:>12}" for n in names)]
    for lang in langs:
        lines.append(f"{'cos to consensus ' + lang:<24}" + "".join(cell(results[n]['cosine_to_consensus'][lang])
                                                                  for n in names))  # fmt: skip
    lines.append(f"{'s1 share':<24}" + "".join(cell(results[n]["s1_share"]) for n in names))
    lines.append(f"{'between-prompt cosine':<24}" + "".join(cell(results[n]["between_prompt_cosine"]) for n in names))
    return (
        "per-language cosine to the prompt's consensus (1 = the variant reads like the consensus); s1 share "
        "(1 = all variants collinear); between-prompt cosine (near 1 = prompts collapsed); n/a = no data\n"
        + "\n".join(lines)
    )


def plot_eval(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(next(iter(results.values()))["cosine_to_consensus"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(results)
    for i, (name, res) in enumerate(results.items()):
        ax.bar(
            [j + i * width for j in range(len(langs))],
            [res["cosine_to_consensus"][lang] for lang in langs],
            width,
            label=name,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(langs))], langs)
    ax.set_ylabel("cosine to consensus")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


# ---------------------------------------------------------------------------------------------------------------
# options shared by the commands

MLC_FLAG_NAMES = {"languages": "languages"}  # MLCArguments field -> command-line name (others: mlc_<field>)


def _mlc_flag(name: str) -> str:
    return MLC_FLAG_NAMES.get(name, f"mlc_{name}")


def mlc_options_dataclass():
    """A dataclass with one ``--mlc_<field>`` option per field of :class:`MLCArguments` (``--languages`` as a
    comma list, default: the ten languages; ``--mlc_base_language`` default: the first language), with the
    fields' help and choices, for ``HfArgumentParser``/``TrlParser``."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(MLCArguments)
    specs = []
    for f in dataclasses.fields(MLCArguments):
        typ, default, meta = hints[f.name], f.default, dict(f.metadata)
        if f.name == "languages":
            typ, default = str, ",".join(LANGUAGES)
            meta["help"] += " (comma list)"
        elif f.name == "base_language":
            typ, default = str | None, None
            meta["help"] += " (default: the first of --languages)"
        specs.append((_mlc_flag(f.name), typ, dataclasses.field(default=default, metadata=meta)))
    return dataclasses.make_dataclass("MLCOptions", specs)


def mlc_arguments_from(options) -> MLCArguments:
    """:class:`MLCArguments` from a parsed ``MLCOptions`` (or argparse namespace); bad values -> UsageError
    naming the option."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(MLCArguments):
        if hasattr(options, _mlc_flag(f.name)):
            values[f.name] = getattr(options, _mlc_flag(f.name))
    languages = tuple(lang.strip() for lang in str(values.get("languages", "en")).split(","))
    values["languages"] = languages
    if values.get("base_language") is None:
        values["base_language"] = languages[0]
    try:
        return MLCArguments(**values)
    except ValueError as err:
        raise UsageError(_option_message(str(err))) from err


def _option_message(text: str) -> str:
    """``MLCArguments.weight must ...`` -> ``--mlc_weight must ...``."""
    import re

    return re.sub(r"MLCArguments\.(\w+)", lambda m: f"--{_mlc_flag(m.group(1))}", text)


def _add_mlc_options(p: argparse.ArgumentParser) -> None:
    """The MLC options on a plain argparse parser (eval), named as in ``mlc train``."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(mlc_options_dataclass())
    for f in dataclasses.fields(mlc_options_dataclass()):
        if f.name in ("mlc_grad_cache", "mlc_chunk_prompts", "mlc_log_metrics"):
            continue  # training only
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        typ = hints[f.name]
        if typ is bool:
            p.add_argument(*flags, type=_boolean, default=f.default, metavar="{true,false}", help=f.metadata["help"])
            continue
        kind = {int: int, float: float}.get(typ, int if typ == int | None else str)
        p.add_argument(*flags, type=kind, default=f.default, choices=f.metadata.get("choices"),
                       help=f.metadata["help"])  # fmt: skip


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _check_output_folder(path: str | Path, option: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {out} is an existing file, not a folder; give a folder path")
    return out


def _looks_like_path(name: str) -> bool:
    """Whether a model argument is meant as a local path: absolute, relative with ./ ../ ~, backslashes,
    more than one '/', or a first component that exists here (``runs/x`` with a ``runs`` folder)."""
    if name.startswith(("/", "./", "../", "~", ".")) or "\\" in name or name.count("/") > 1 or name.endswith("/"):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def resolve_model_path(name: str, option: str = "--model") -> tuple[str, bool]:
    """``(name, local)``: a local folder (then loading is offline) or a hub id. A name that looks like a path
    but is not a folder is refused at once, without a network attempt."""
    import os

    if not name:
        raise UsageError(f"{option} is required: a local model folder or a hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{option} {name}: the folder has no config.json; give a saved transformers model folder")
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local model: never ask the hub for anything
        return str(path), True
    if path.exists():
        raise UsageError(f"{option} {name} is a file; give a saved model folder or a hub id")
    if _looks_like_path(name) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true"):
        raise UsageError(f"{option} {name}: no such folder; give the path of a saved model folder (or a hub id)")
    return name, False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_tokenizer(name: str, local: bool, option: str = "--model"):
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=local)
    except Exception as err:  # noqa: BLE001 - every loading failure is the input's problem
        raise UsageError(f"{option} {name}: cannot load the tokenizer ({_first_line(err)})") from err
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"{option} {name}: the tokenizer has no chat template (the variants are chat-templated prompts); "
            "use a chat/instruct model or add a chat_template to its tokenizer_config.json"
        )
    return tokenizer


def load_model(name: str, local: bool, option: str = "--model", ignore_extractor: bool = False, **kwargs):
    """``AutoModelForCausalLM`` from ``name``; ``ignore_extractor``: a checkpoint written by ``mlc train``
    holds ``mlc_head.*`` beside the model's weights; they are skipped without a load report."""
    import transformers

    try:
        cls = transformers.AutoModelForCausalLM
        if ignore_extractor:
            config = transformers.AutoConfig.from_pretrained(name, local_files_only=local)
            base = transformers.AutoModelForCausalLM._model_mapping[type(config)]
            cls = type(base.__name__, (base,), {"_keys_to_ignore_on_load_unexpected": [r"^mlc_head\."]})
            kwargs["config"] = config
        return cls.from_pretrained(name, local_files_only=local, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"{option} {name}: cannot load the model ({_first_line(err)})") from err


def _check_layer(mlc: MLCArguments, model) -> int:
    try:
        return mlc.check(model)
    except ValueError as err:
        raise UsageError("--mlc_layer: " + _option_message(str(err))) from err


# ---------------------------------------------------------------------------------------------------------------
# mlc train

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
        raise UsageError(f"--config {path}: cannot read it ({_first_line(err)})") from err
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path}: not valid YAML ({_first_line(err)})") from err
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
    """``TrlParser`` over (TrainArguments, MLC options, the algorithm's TRL config, TRL's ModelConfig)."""
    from trl import ModelConfig, TrlParser

    from .trl_trainers import CONFIGS

    config_cls = CONFIGS[algorithm]
    parser = TrlParser(
        (TrainArguments, mlc_options_dataclass(), config_cls, ModelConfig), prog="mlc train",
        description=f"Train with {algorithm.upper()} + MLC. Options: mlc train's own, the MLC term (--mlc_*), "
        f"TRL's {config_cls.__name__} and ModelConfig (LoRA: --use_peft). --config FILE.yaml sets any of them "
        "(command-line values win). --model is --model_name_or_path, --batch-size --per_device_train_batch_size.",
    )  # fmt: skip
    defaults = dict(TRAIN_DEFAULTS, use_cpu=not torch.cuda.is_available())
    if algorithm == "simpo":
        defaults.update(loss_type="simpo", cpo_alpha=0.0)
    parser.set_defaults(**defaults)
    parser.add_argument("--config", default=None, help="YAML file of options (like trl dpo --config)")
    return parser


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
    try:  # TrlParser reads --config FILE itself; the 5th output is the namespace of --config
        script, options, training, model_config = parser.parse_args_and_config(argv)[:4]
    except ValueError as err:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        raise UsageError(_first_line(err).split(": ", 1)[-1]) from err
    return script, mlc_arguments_from(options), training, model_config


def _check_train_arguments(script: TrainArguments, training, model_config) -> None:
    import importlib.util

    from .trainers import launched_with

    if isinstance(script.max_samples, bool) or script.max_samples < 0:
        raise UsageError(f"--max_samples must be an int >= 0 (0: all records), got {script.max_samples}")
    if not model_config.model_name_or_path:
        raise UsageError("--model is required: a local model folder or a hub id")
    _check_output_folder(training.output_dir, "--output_dir")
    deepspeed = training.deepspeed
    if isinstance(deepspeed, str) and not Path(deepspeed).is_file():
        raise UsageError(f"--deepspeed must be a DeepSpeed JSON config file, {deepspeed} is not")
    if (deepspeed or launched_with("DEEPSPEED")) and importlib.util.find_spec("deepspeed") is None:
        source = "--deepspeed" if deepspeed else "accelerate launch with a DeepSpeed config"
        raise UsageError(f"{source} needs the deepspeed package (pip install deepspeed)")
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


def cmd_train(argv: list[str]) -> None:
    import transformers
    from trl import get_peft_config

    from .records import check_languages, load_checked
    from .trainers import NonFiniteTrainingError
    from .trl_trainers import TRAINERS

    script, mlc, training, model_config = parse_train_arguments(argv)
    _check_train_arguments(script, training, model_config)
    records, where = load_checked(script.dataset, script.algorithm, "train" if script.dataset == "sample" else None,
                                  script.dataset_format)  # fmt: skip
    if script.max_samples:
        records, where = records[: script.max_samples], where[: script.max_samples]
    report = check_languages(records, where, mlc.languages, mlc.base_language)
    name, local = resolve_model_path(model_config.model_name_or_path)
    tokenizer = load_tokenizer(name, local)
    model = load_model(name, local, **_model_kwargs(model_config))
    _check_layer(mlc, model)
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


# ---------------------------------------------------------------------------------------------------------------
# mlc eval


def load_extractor(directory: str, hidden_size: int):
    from .head import MLCHead

    try:
        head = MLCHead.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UsageError(f"--extractor: {str(err).removeprefix('MLCHead.from_pretrained: ')}") from err
    if head.hidden_size != hidden_size:
        raise UsageError(
            f"--extractor {directory}: its hidden_size is {head.hidden_size} but the model's is {hidden_size}; "
            "give the extractor trained with this model (<output_dir>/mlc_head)"
        )
    return head


def _json_safe(value):
    """NaN/inf -> None (JSON null), recursively."""
    import math

    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def cmd_eval(args) -> None:
    from .records import EVAL, load_checked

    out = _check_output_folder(args.out, "--out")
    records, _ = load_checked(args.prompts, EVAL, args.split if args.prompts == "sample" else None, args.dataset_format)
    mlc = mlc_arguments_from(args)
    name, local = resolve_model_path(args.model)
    tokenizer = load_tokenizer(name, local)
    model = load_model(name, local, ignore_extractor=True)
    _check_layer(mlc, model)
    head = load_extractor(args.extractor, model.config.hidden_size) if args.extractor else None
    result = evaluate(model, tokenizer, records, mlc, head)
    result["model"], result["extractor"] = str(args.model), args.extractor
    print(format_eval({"model": result}))
    out.mkdir(parents=True, exist_ok=True)
    plot_eval({"model": result}, out / "eval.png")
    (out / "eval.json").write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n")
    print(f"mlc eval: wrote {out / 'eval.json'} and {out / 'eval.png'}")




def cmd_demo(args) -> None:
    from .transfer.demo import run_demo

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    out = _check_output_folder(args.out, "--out")
    run_demo(out, steps=args.steps, seed=args.seed, mlc_weight=args.mlc_weight, workers=args.workers)


def cmd_transfer(args) -> None:
    from .transfer.experiment import run_from_args

    if args.out is not None:
        _check_output_folder(args.out, "--out")
    run_from_args(args)


# ---------------------------------------------------------------------------------------------------------------
# the command


def _debug_requested(argv: list[str]) -> bool:
    import os

    return "--debug" in argv or os.environ.get("MLC_DEBUG", "").lower() in ("1", "true", "yes")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="mlc", description=__doc__.splitlines()[0], formatter_class=fmt,
                                     epilog="--debug (or MLC_DEBUG=1): show the traceback of an error")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also: MLC_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train with an alignment loss + MLC (mlc train --help: its options)", add_help=False)
    p_eval = sub.add_parser("eval", help="per-language consistency table", formatter_class=fmt)
    p_eval.add_argument("--model", required=True, help="a saved model folder (e.g. mlc train's --output_dir) or hub id")
    p_eval.add_argument("--extractor", default=None, help="an MLCHead folder (<output_dir>/mlc_head of mlc train)")
    p_eval.add_argument("--prompts", default="sample",
                        help="JSONL file of records, LLaMA-Factory JSON (format in README), or 'sample'")
    p_eval.add_argument("--dataset_format", "--dataset-format", default="auto",
                        choices=["auto", "jsonl", "llamafactory"],
                        help="auto: a file starting with '[' is LLaMA-Factory JSON, else JSONL")  # fmt: skip
    p_eval.add_argument("--split", default="heldout", choices=["train", "heldout"], help="split of 'sample'")
    p_eval.add_argument("--out", default=".", help="folder for eval.json and eval.png")
    _add_mlc_options(p_eval)
    p_demo = sub.add_parser("demo", help="the offline demo (shipped world-v2 model: DPO vs DPO+MLC, CPU)",
                            formatter_class=fmt)  # fmt: skip
    p_demo.add_argument("--out", default="mlc_demo", help="output folder (the starting model is saved in <out>/model)")
    p_demo.add_argument("--steps", type=int, default=120, help="alignment steps of each run")
    p_demo.add_argument("--mlc-weight", type=_finite_float, default=None,
                        help="MLC weight (default: the pre-registered weight rule's choice)")  # fmt: skip
    p_demo.add_argument("--seed", type=int, default=0, help="alignment seed")
    p_demo.add_argument("--workers", type=int, default=None,
                        help="processes for the two alignment runs (default: one per CPU core, at most 2)")  # fmt: skip
    p_transfer = sub.add_parser("transfer", help="cross-lingual transfer of base-language alignment (synthetic world)",
                                formatter_class=fmt)  # fmt: skip
    p_transfer.add_argument("--quick", action="store_true", help="3 seeds, 64+64 prompts per language (< 10 min)")
    p_transfer.add_argument("--out", default="transfer_out", help="folder for the table, CSV, JSON and PNG")
    p_transfer.add_argument("--cache-dir", default=None, help="checkpoint cache (~/.cache/mlc_kernels/transfer)")
    p_transfer.add_argument("--no-cache", action="store_true", help="pretrain afresh and keep nothing")
    p_transfer.add_argument("--seeds", default=None,
                            help="comma list of alignment seeds (v2: 0,1,2; v1 quick: 0,1,2, full: 0..4)")  # fmt: skip
    p_transfer.add_argument("--mlc-layer", type=int, default=None,
                            help="decoder layer k (default: v2 3 of 4, the gate rule's; v1 2 of 4)")  # fmt: skip
    p_transfer.add_argument("--mlc-weight", type=_finite_float, default=None,
                            help="MLC weight of every arm (default: v2 the pre-registered ones; v1 1.0)")  # fmt: skip
    p_transfer.add_argument("--mlc-tau", type=_finite_float, default=None, help="MLC temperature (default 1.0)")
    p_transfer.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per alignment run (default: 1 with several "
        "workers, else torch's)"
    )  # fmt: skip
    p_transfer.add_argument("--workers", type=int, default=None, help="v2: alignment runs at a time, each in its own "
                            "process (default: one per CPU core)")  # fmt: skip
    p_transfer.add_argument("--world", default="v2", help="v2 (the code-switching world, with its gate) or v1")
    p_transfer.add_argument("--world-seed", type=int, default=None, help="world and pretraining seed (default 0)")
    sub.add_parser("bench", help="kernel benchmarks (mlc-bench; mlc bench --help)", add_help=False)
    return parser


def _finite_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _run_bench(rest: list[str]) -> None:
    """``mlc-bench`` under the name ``mlc bench`` (its parser's usage and error lines say ``mlc bench``)."""
    from unittest import mock

    from .benchmarks.runner import main as bench_main

    init = argparse.ArgumentParser.__init__

    def renamed(self, *args, **kwargs) -> None:
        if kwargs.get("prog") == "mlc-bench":
            kwargs["prog"] = "mlc bench"
        init(self, *args, **kwargs)

    with mock.patch.object(argparse.ArgumentParser, "__init__", renamed):
        bench_main(rest)


def main(argv: list[str] | None = None) -> None:
    """The ``mlc`` command. User errors: ``mlc <command>: error: ...`` on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        if command == "train":
            cmd_train(argv[argv.index("train") + 1 :])
            return
        if command == "bench":
            _run_bench(argv[argv.index("bench") + 1 :])
            return
        args = parser.parse_args(argv)
        {"eval": cmd_eval, "demo": cmd_demo, "transfer": cmd_transfer}[args.command](args)
    except UsageError as err:
        if debug:
            raise
        print(f"mlc {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mlc {command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (SystemExit, BaseException) as err:
        if isinstance(err, SystemExit) or debug:
            raise
        print(f"mlc {command}: error: {_first_line(err)} (an unexpected error; rerun with --debug for the traceback "
              "and report it)", file=sys.stderr)  # fmt: skip
        raise SystemExit(1) from None


if __name__ == "__main__":
    sys.exit(main())
