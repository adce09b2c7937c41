"""Write the checkpoint that ships with the package (``mlc_kernels/transfer/data/world_v2/``): world v2 seed 0,
:data:`mlc_kernels.transfer.protocol.MODEL`, pretrained by the package's own code, with its ``recipe.json``::

    python -m experiments.transfer.ship [--out DIR] [--cache-dir DIR] [--mlc-layer K]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from mlc_kernels.transfer.gate import measure, summarise
from mlc_kernels.transfer.pretrain import SHIPPED, cache_key, pretrained
from mlc_kernels.transfer.protocol import MODEL
from mlc_kernels.transfer.world import World, world_config


def ship(out: Path = SHIPPED, cache_dir: Path | None = None, mlc_layer: int = 0) -> None:
    """Write the shipped checkpoint: world v2 seed 0, :data:`MODEL`, pretrained by this package; ``mlc_layer``: the
    gate rule's layer (0: measured here on this checkpoint)."""
    world = World(world_config("v2", 0))
    model, tokenizer, _ = pretrained(world, MODEL, cache_dir, shipped=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not mlc_layer:
        mlc_layer = summarise([measure(model, tokenizer, world)], [s.code for s in world.config.languages])["mlc_layer"]
    recipe = {"world": "v2", "world_seed": 0, "model": asdict(MODEL), "cache_key": cache_key(world.config, MODEL),
              "mlc_layer": mlc_layer}  # fmt: skip
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.transfer.ship", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED, help="checkpoint folder (default: the package's)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="pretraining cache (default: none, pretrain)")
    parser.add_argument("--mlc-layer", type=int, default=0, help="the gate rule's layer (0: measure it here)")
    args = parser.parse_args(argv)
    ship(args.out, args.cache_dir, args.mlc_layer)


if __name__ == "__main__":
    main()
