"""What the commands share: the MLC options (``--mlc_<field>`` of :class:`MLCArguments`), model and tokenizer
loading with one-line errors naming the option, output-folder and number checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.utils import HelpFormatter
from ..errors import UsageError
from ..sample_data import LANGUAGES
from ..trainers import MLCArguments

HELP_FORMAT = HelpFormatter
"""The help formatter of ``mlc`` and its commands: each default shown once (not None, False, or a default the
help text states)."""

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
        return MLCArguments(**values)  # validates every field, tau's lower bound included
    except ValueError as err:
        raise UsageError(_option_message(str(err))) from err


def _option_message(text: str) -> str:
    """``MLCArguments.weight must ...`` -> ``--mlc_weight must ...``."""
    import re

    return re.sub(r"MLCArguments\.(\w+)", lambda m: f"--{_mlc_flag(m.group(1))}", text)


def add_mlc_options(p: argparse.ArgumentParser) -> None:
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


def check_output_folder(path: str | Path, option: str) -> Path:
    """``path`` as a Path; refused (naming ``option``) when it is a file or cannot be created or written here.
    Checked by creating and removing a probe file in the folder or its nearest existing parent: nothing stays."""
    import tempfile

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {out} is an existing file, not a folder; give a folder path")
    existing = out.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    reason = None
    if not existing.is_dir():
        reason = f"{existing} is a file"
    else:
        try:
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as err:
            reason = f"{existing} is not writable: {err.strerror or type(err).__name__}"
    if reason is not None:
        action = "write into it" if existing == out.expanduser().absolute() else "create it here"
        raise UsageError(f"{option} {out}: cannot {action} ({reason}); give a writable folder")
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
    if _hub_cached(name):
        return name, False
    reason = hub_unreachable()
    if reason is not None:  # the hub client would retry for about a minute before the same answer
        raise UsageError(f"{option} {name}: no such folder, and the hub cannot be reached to fetch it ({reason}); "
                         "give a saved model folder, or connect and retry")  # fmt: skip
    return name, False


HUB_PROBE_TIMEOUT_S = 3.0


def _hub_cached(name: str) -> bool:
    """Whether the hub cache holds ``name``'s config.json (then loading works offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id: the loader says what is wrong with it
        return False


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub (``HF_ENDPOINT``, default huggingface.co) opens within ``timeout``
    seconds (name lookup included), else the reason. Behind a proxy (``HTTPS_PROXY`` ...) it is not probed."""
    import os
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if urllib.request.getproxies().get(url.scheme or "https"):
        return None
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = [f"no answer from {host} within {timeout:g} s"]

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as err:
            result[0] = f"{host}: {err.strerror or type(err).__name__}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0]


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_tokenizer(name: str, local: bool, option: str = "--model"):
    import transformers

    try:
        cls = transformers.AutoTokenizer
        config = Path(name) / "tokenizer_config.json"
        if local and (Path(name) / "tokenizer.json").is_file() and config.is_file():
            import json

            generic = ("TokenizersBackend", "PreTrainedTokenizerFast")
            if json.loads(config.read_text()).get("tokenizer_class") in generic:
                cls = transformers.PreTrainedTokenizerFast  # the folder's own tokenizer.json, not the model type's
        tokenizer = cls.from_pretrained(name, local_files_only=local)
    except Exception as err:  # noqa: BLE001 - every loading failure is the input's problem
        raise UsageError(f"{option} {name}: cannot load the tokenizer ({first_line(err)})") from err
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
        raise UsageError(f"{option} {name}: cannot load the model ({first_line(err)})") from err


def check_layer(mlc: MLCArguments, model) -> int:
    try:
        return mlc.check(model)
    except ValueError as err:
        raise UsageError("--mlc_layer: " + _option_message(str(err))) from err


def finite_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
