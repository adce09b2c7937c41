"""Pretraining of a tiny decoder-only model (transformers ``Qwen2Config``, random init) on a world's texts.

A short torch loop on the causal-LM loss over every language's documents (mixed and shuffled), on CPU.
The checkpoint (model + tokenizer) is cached under ``<cache_dir>/<hash of world and model config>`` and
reused; nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .world import World, WorldConfig, world_tokenizer

DEFAULT_CACHE = Path("~/.cache/mlc_kernels/transfer").expanduser()
SHIPPED = Path(__file__).parent / "data" / "world_v2"
"""The pretrained world-v2 model and tokenizer that ship with the package (``recipe.json``: how they were made,
with the cache key of the world and model config they were pretrained from)."""


@dataclass(frozen=True)
class ModelConfig:
    """The tiny model and its pretraining: ``steps`` optimizer steps of ``batch_size`` documents."""

    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 256
    steps: int = 800
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0


def cache_key(world: WorldConfig, model: ModelConfig) -> str:
    """Hash of everything the pretrained checkpoint depends on."""
    settings = asdict(world)
    v3_only = ("no_unsafe_refusal", "monolingual_responses", "warned_compliance", "parallel_languages")
    for name in v3_only:  # v1/v2 keys unchanged
        if not settings[name]:
            del settings[name]
    blob = json.dumps({"world": settings, "model": asdict(model)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_model(vocab_size: int, config: ModelConfig):
    """A ``Qwen2ForCausalLM`` from a config, randomly initialised with ``config.seed``."""
    import transformers

    torch.manual_seed(config.seed)
    model_config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(model_config)


def pretrain(world: World, config: ModelConfig, log=print, device: str = "cpu"):
    """Pretrain a fresh model on ``world.pretraining_texts()``; returns ``(model, tokenizer)`` (on CPU).
    Linear warm-up (5%) then cosine decay; right-padded batches, loss on every non-pad token. ``device``:
    where the steps run (the same data and order anywhere; the numerics differ slightly between devices)."""
    tokenizer = world_tokenizer(world)
    docs = [doc for texts in world.pretraining_texts().values() for doc in texts]
    encoded = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    model = new_model(len(tokenizer), config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    warmup = max(1, config.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(config.seed)
    order: list[int] = []
    model.train()
    start = time.time()
    for step in range(config.steps):
        if len(order) < config.batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = [encoded[i] for i in order[: config.batch_size]], order[config.batch_size :]
        width = max(len(ids) for ids in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        att = torch.zeros(len(batch), width, dtype=torch.long)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            att[row, : len(tokens)] = 1
        labels = ids.masked_fill(att == 0, -100)
        ids, att, labels = ids.to(device), att.to(device), labels.to(device)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, config.steps // 10) == 0 or step + 1 == config.steps:
            log(f"  pretrain step {step + 1}/{config.steps}: loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    model.to("cpu").eval()
    return model, tokenizer


def load_checkpoint(path: Path):
    """``(model, tokenizer)`` of a saved world checkpoint (``Qwen2ForCausalLM`` in eval mode, its tokenizer)."""
    import transformers

    model = transformers.Qwen2ForCausalLM.from_pretrained(path)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    model.eval()
    return model, tokenizer


def load_shipped(path: Path = SHIPPED):
    """``(model, tokenizer, recipe)`` of the shipped checkpoint (eval mode)."""
    return (*load_checkpoint(path), json.loads((path / "recipe.json").read_text()))


def shipped_key() -> str | None:
    """The cache key recorded with the shipped checkpoint (None if it is absent)."""
    recipe = SHIPPED / "recipe.json"
    return json.loads(recipe.read_text())["cache_key"] if recipe.is_file() else None


def pretrained(world: World, config: ModelConfig, cache_dir: Path | None = DEFAULT_CACHE, log=print,
               device: str = "cpu", shipped: bool = True):  # fmt: skip
    """The pretrained ``(model, tokenizer)`` of ``world``: loaded from ``cache_dir/<key>`` when there, else from
    the shipped checkpoint when it was made from the same world and model config (unless ``shipped`` is False),
    else pretrained (and saved in
    ``cache_dir`` unless it is None). Returns ``(model, tokenizer, loaded)``."""
    key = cache_key(world.config, config)
    path = Path(cache_dir) / key if cache_dir is not None else None
    found = None
    if path is not None and (path / "config.json").is_file():
        found = path
        log(f"pretrained checkpoint: cached in {path}")
    elif shipped and shipped_key() == key:
        found = SHIPPED
        log(f"pretrained checkpoint: shipped with the package ({SHIPPED}), the output of this pretraining")
    if found is not None:
        return (*load_checkpoint(found), True)
    log(f"pretraining {config.layers}-layer model (hidden {config.hidden_size}) for {config.steps} steps")
    model, tokenizer = pretrain(world, config, log, device)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        log(f"pretrained checkpoint saved in {path}")
    return model, tokenizer, False
