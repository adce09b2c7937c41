"""``MLCHead``: the paper's trainable representation extractor ``r = W h + b``, saved with safetensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS_NAME = "mlc_head.safetensors"
CONFIG_NAME = "mlc_head_config.json"
SETTING_KEYS = ("layer", "objective", "tau", "guard", "base_language", "languages")
"""The MLC settings a head is trained with, saved in its config beside its own shape (``rep_size``): what ``mlc
eval`` takes from it. Heads saved before them have none (then the options apply)."""


class MLCHead(nn.Module):
    """Linear map from the model's hidden size to the representation size.

    ``forward(hidden)``: ``(..., hidden_size)`` -> ``(..., rep_size)``. ``forward(hidden, mask, loss=True)``
    (or ``loss(hidden, mask)``) computes the MLC loss of ``(N, m, hidden_size)`` hidden states through
    :func:`fused_linear_mlc_loss`, without materialising the representations for backward. The loss goes
    through ``forward`` so that an engine sharding the head as its own unit (FSDP) gathers its parameters
    around the call; for that reason the class lists itself in ``_no_split_modules`` when registered on a
    transformers model by the trainers.

    ``bias=False`` and ``orthogonal=True`` (``W`` kept semi-orthogonal through
    ``torch.nn.utils.parametrizations.orthogonal``) go with the ``anchor`` guard: the extractor can then
    neither shrink nor shift the representations towards a trivial minimum. Both are saved in the config.
    """

    def __init__(
        self,
        hidden_size: int,
        rep_size: int,
        bias: bool = True,
        *,
        orthogonal: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("rep_size", rep_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MLCHead: {name} must be a positive int, got {value!r}")
        self.hidden_size, self.rep_size = hidden_size, rep_size
        # own parameters (not an nn.Linear child): engines that gather a module's parameters around its
        # forward (DeepSpeed ZeRO-3, FSDP) then gather them around the fused loss too
        self.weight = nn.Parameter(torch.empty(rep_size, hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(rep_size, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self.settings: dict = {}  # the MLC settings it was trained with (SETTING_KEYS), saved in its config
        self.orthogonal = bool(orthogonal)
        if self.orthogonal:
            from torch.nn.utils.parametrizations import orthogonal as orthogonal_parametrization

            orthogonal_parametrization(self, "weight")

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation (same draws from the generator); an orthogonal head is re-projected."""
        if getattr(self, "orthogonal", False):
            with torch.no_grad():
                weight = torch.empty_like(self.weight)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                self.weight = weight  # the parametrization's right inverse projects it
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.hidden_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, *, loss: bool = False, **loss_options
    ) -> torch.Tensor:
        """Projection of ``hidden``; with ``loss=True`` the fused MLC loss of ``hidden`` ``(N, m, hidden_size)``
        and ``mask`` ``(N, m)`` instead (``loss_options`` as :func:`fused_linear_mlc_loss`, whose defaults are the
        authors' ``objective="relative_sv_softmax", tau=0.2``; ``objective="sv_softmax"`` is the paper text's)."""
        if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1 and hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"MLCHead(hidden_size={self.hidden_size}): hidden has last dimension {hidden.shape[-1]}, "
                             f"expected {self.hidden_size} (the hidden size this extractor was built for)")
        if not loss:
            if mask is not None or loss_options:
                raise ValueError("MLCHead: mask and loss options need loss=True")
            return F.linear(hidden, self.weight, self.bias)
        from .fused_linear import fused_linear_mlc_loss

        return fused_linear_mlc_loss(hidden, self.weight, self.bias, mask, **loss_options)

    def loss(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, **loss_options) -> torch.Tensor:
        """MLC loss of ``hidden`` ``(N, m, hidden_size)``; keyword arguments as ``fused_linear_mlc_loss`` (default:
        the authors' ``relative_sv_softmax`` at ``tau=0.2``)."""
        return self(hidden, mask, loss=True, **loss_options)

    def config(self) -> dict:
        config = {"hidden_size": self.hidden_size, "rep_size": self.rep_size, "bias": self.bias is not None}
        if self.orthogonal:  # absent for the default head: its config file stays as it was
            config["orthogonal"] = True
        config.update({k: self.settings[k] for k in SETTING_KEYS if k in self.settings})
        return config

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        settings: dict | None = None) -> Path:  # fmt: skip
        """Write ``mlc_head.safetensors`` and ``mlc_head_config.json`` into ``directory``; returns it.
        ``state_dict`` (keys ``weight``/``bias``): full tensors to write
        instead of the module's own, e.g. gathered by an engine that shards the head. ``settings``: the MLC
        settings it was trained with (keys of :data:`SETTING_KEYS`; the trainers pass them), kept in
        :attr:`settings` and written into the config."""
        from safetensors.torch import save_file

        if settings is not None:
            unknown = set(settings) - set(SETTING_KEYS)
            if unknown:
                raise ValueError(f"MLCHead.save_pretrained: unknown settings {sorted(unknown)}; known: {SETTING_KEYS}")
            self.settings = dict(settings)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        own = {"weight": self.weight, **({"bias": self.bias} if self.bias is not None else {})}
        if self.orthogonal and state_dict and any(k.startswith("parametrizations.") for k in state_dict):
            # the engine's state dict holds the parametrization's inner tensors: write the module's own W
            # (an orthogonal head sharded by FSDP/ZeRO-3 is not supported: its W would be a shard)
            state_dict = None
        source = state_dict or own
        names = ["weight"] + (["bias"] if self.bias is not None else [])
        if sorted(source) != sorted(names):
            raise ValueError(f"MLCHead.save_pretrained: state_dict holds {sorted(source)}, expected {names}")
        tensors = {}
        for name in names:
            tensor = source[name]
            if hasattr(tensor, "full_tensor"):
                raise ValueError(
                    f"MLCHead.save_pretrained: {name} is a sharded DTensor; pass the gathered state_dict "
                    "(the trainers do: the engine's full state dict)"
                )
            tensors[name] = tensor.detach().contiguous().cpu()
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        (out / CONFIG_NAME).write_text(json.dumps(self.config(), indent=1) + "\n")
        return out

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MLCHead:
        """Load a head written by :meth:`save_pretrained`; refuses files whose tensors do not match the config."""
        from safetensors.torch import load_file

        src = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (src / name).is_file():
                raise FileNotFoundError(f"MLCHead.from_pretrained: {src / name} does not exist")
        try:
            config = json.loads((src / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"MLCHead.from_pretrained: {src / CONFIG_NAME} is not valid JSON ({err})") from err
        if not isinstance(config, dict):
            raise ValueError(f"MLCHead.from_pretrained: {src / CONFIG_NAME} must hold a JSON object")
        missing = {"hidden_size", "rep_size", "bias"} - set(config)
        if missing:
            raise ValueError(f"MLCHead.from_pretrained: {src / CONFIG_NAME} lacks {sorted(missing)}")
        for key, kind in (("hidden_size", int), ("rep_size", int), ("bias", bool)):
            value = config[key]
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
                raise ValueError(
                    f"MLCHead.from_pretrained: {src / CONFIG_NAME}: {key} must be a "
                    f"{'positive integer' if kind is int else 'boolean'}, got {value!r}"
                )
        try:
            tensors = load_file(str(src / WEIGHTS_NAME))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ValueError(
                f"MLCHead.from_pretrained: {src / WEIGHTS_NAME} is damaged or not a safetensors file ({err})"
            ) from err
        expected = {"weight": (config["rep_size"], config["hidden_size"])}
        if config["bias"]:
            expected["bias"] = (config["rep_size"],)
        if set(tensors) != set(expected):
            raise ValueError(
                f"MLCHead.from_pretrained: {src / WEIGHTS_NAME} holds {sorted(tensors)}, expected {sorted(expected)}"
            )
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(
                    f"MLCHead.from_pretrained: {key} in {src / WEIGHTS_NAME} has shape {tuple(tensors[key].shape)}, "
                    f"expected {shape} from {CONFIG_NAME} (hidden_size={config['hidden_size']}, "
                    f"rep_size={config['rep_size']})"
                )
        head = cls(config["hidden_size"], config["rep_size"], bias=config["bias"],
                   orthogonal=bool(config.get("orthogonal", False)), device=device, dtype=dtype)  # fmt: skip
        head.settings = {k: config[k] for k in SETTING_KEYS if k in config}
        with torch.no_grad():
            if head.orthogonal:
                head.weight = tensors["weight"].to(head.weight)  # through the parametrization's right inverse
            else:
                head.weight.copy_(tensors["weight"])
            if config["bias"]:
                head.bias.copy_(tensors["bias"])
        return head
