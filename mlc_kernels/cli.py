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
from pathlib import Path

import torch

from .sample_data import ALGORITHMS, LANGUAGES, load_records, load_sample, to_dataset
from .trainers import MLCArguments

DISCLAIMER = (
    "Note: the demo model is a randomly initialised mini model; this run demonstrates the machinery "
    "(variant passes, extractor, loss, metrics), not safety."
)


def demo_tokenizer(texts: list[str], vocab_size: int = 1200):
    """A byte-level BPE tokenizer trained in memory on ``texts``, with a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tk = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tk.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
        "{% else %}<|assistant|>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tk


def demo_model(vocab_size: int, seed: int = 0):
    """A mini Qwen2-style causal LM from a transformers config (random init)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config)


def demo_model_and_tokenizer(seed: int = 0):
    """The offline demo pair: the tokenizer trained on the embedded sample set (all prompts and translations,
    the training responses) and the mini model sized to it."""
    train_records, heldout = load_sample("train"), load_sample("heldout")
    texts = [r["prompt"] for r in train_records + heldout] + [
        t for r in train_records + heldout for t in r["variants"].values() if t
    ]
    texts += [r["chosen"] for r in train_records] + [r["rejected"] for r in train_records]
    tokenizer = demo_tokenizer(texts)
    return demo_model(len(tokenizer), seed=seed), tokenizer


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
    """A table: one row per language, one column per result set (e.g. before / after)."""
    names = list(results)
    langs = list(next(iter(results.values()))["cosine_to_consensus"])
    lines = [f"{'language':<10}" + "".join(f"{n:>12}" for n in names)]
    for lang in langs:
        lines.append(f"{lang:<10}" + "".join(f"{results[n]['cosine_to_consensus'][lang]:>12.4f}" for n in names))
    lines.append(f"{'s1 share':<10}" + "".join(f"{results[n]['s1_share']:>12.4f}" for n in names))
    lines.append(f"{'between':<10}" + "".join(f"{results[n]['between_prompt_cosine']:>12.4f}" for n in names))
    return "cosine to consensus per language (1 = the variant reads like the consensus)\n" + "\n".join(lines)


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


def build_trainer(
    model,
    tokenizer,
    records,
    algorithm: str,
    mlc: MLCArguments,
    out: Path,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    gradient_accumulation_steps: int = 1,
    save_steps: int = 0,
    deepspeed: str | None = None,
):
    """The TRL trainer of ``algorithm`` with the MLC term, on ``records``. ``batch_size`` is per process;
    ``save_steps`` > 0 writes a resumable checkpoint (model, extractor, optimizer, scheduler, RNG, data
    position) every that many optimizer steps; ``deepspeed``: a DeepSpeed JSON config."""
    from .trainers import trl_classes

    trainer_cls, config_cls = trl_classes(algorithm)
    options = dict(
        output_dir=str(out), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=learning_rate,
        gradient_accumulation_steps=gradient_accumulation_steps, logging_steps=1, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=False, deepspeed=deepspeed,
    )  # fmt: skip
    if algorithm == "simpo":
        options.update(loss_type="simpo", cpo_alpha=0.0)
    extra = {"ref_model": copy.deepcopy(model)} if algorithm == "dpo" else {}
    dataset = to_dataset(records, algorithm, mlc.languages, mlc.base_language)
    return trainer_cls(
        model=model,
        args=config_cls(**options),
        train_dataset=dataset,
        processing_class=tokenizer,
        mlc_args=mlc,
        **extra,
    )


def apply_liger_kernels(model) -> None:
    """Patch ``model`` with Liger-Kernel's Triton kernels (RMSNorm, RoPE, SwiGLU, ...) through its own patch
    function. CUDA only: Liger's kernels are GPU kernels; an explicit request elsewhere is refused."""
    if not torch.cuda.is_available():
        raise SystemExit("mlc train: --liger-kernels needs a CUDA device (Liger's model kernels are GPU kernels)")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as err:
        raise SystemExit("mlc train: --liger-kernels needs liger-kernel (pip install liger-kernel)") from err
    _apply_liger_kernel_to_instance(model=model)


def _check_dataset_has_variants(records, mlc: MLCArguments) -> None:
    others = [lang for lang in mlc.languages if lang != mlc.base_language]
    if not any(r["variants"].get(lang) for r in records for lang in others):
        raise SystemExit(f"mlc: the dataset has no translated variants for languages {others}: MLC needs them")


def _mlc_arguments(args) -> MLCArguments:
    return MLCArguments(
        languages=tuple(args.languages.split(",")), weight=args.mlc_weight, tau=args.mlc_tau, layer=args.mlc_layer,
        objective=args.mlc_objective, rep_size=args.mlc_rep_size, impl=args.mlc_impl,
        generation_prompt=not args.no_generation_prompt,
    )  # fmt: skip


def _check_train_arguments(args) -> None:
    import importlib.util

    from .trainers import launched_with

    if args.algorithm not in ALGORITHMS:
        raise SystemExit(f"mlc train: --algorithm must be one of {ALGORITHMS}, got {args.algorithm!r}")
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"mlc train: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.save_steps < 0:
        raise SystemExit(f"mlc train: --save-steps must be >= 0 (0: no intermediate checkpoint), got {args.save_steps}")
    if args.deepspeed is not None and not Path(args.deepspeed).is_file():
        raise SystemExit(f"mlc train: --deepspeed must be a DeepSpeed JSON config file, {args.deepspeed} is not")
    if (args.deepspeed is not None or launched_with("DEEPSPEED")) and importlib.util.find_spec("deepspeed") is None:
        source = "--deepspeed" if args.deepspeed is not None else "accelerate launch with a DeepSpeed config"
        raise SystemExit(f"mlc train: {source} needs the deepspeed package (pip install deepspeed)")
    resume = args.resume_from_checkpoint
    if resume not in (None, "last") and not Path(resume).is_dir():
        raise SystemExit(f"mlc train: --resume-from-checkpoint must be a checkpoint folder or 'last', got {resume}")


def cmd_train(args) -> None:
    import transformers

    _check_train_arguments(args)
    records = (
        load_sample("train", args.algorithm) if args.dataset == "sample" else load_records(args.dataset, args.algorithm)
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    mlc = _mlc_arguments(args)
    try:
        mlc.check(model)
    except ValueError as err:
        raise SystemExit(f"mlc train: {err}") from err
    if args.liger_kernels:
        apply_liger_kernels(model)
    _check_dataset_has_variants(records, mlc)
    out = Path(args.output_dir)
    trainer = build_trainer(
        model,
        tokenizer,
        records,
        args.algorithm,
        mlc,
        out,
        steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        save_steps=args.save_steps,
        deepspeed=args.deepspeed,
    )
    resume = args.resume_from_checkpoint
    if resume == "last":
        resume = transformers.trainer_utils.get_last_checkpoint(str(out))
        if resume is None:
            raise SystemExit(f"mlc train: --resume-from-checkpoint last: no checkpoint-* folder in {out}")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(out))
        plot_training(trainer.state.log_history, mlc.languages, out / "training.png")
        print(f"mlc train: checkpoint and extractor (mlc_head/) in {out}; curves in {out / 'training.png'}")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # under torchrun/accelerate launch: destroy the process group cleanly


def cmd_eval(args) -> None:
    import transformers

    from .head import MLCHead

    records = load_sample(args.split) if args.prompts == "sample" else load_records(args.prompts, "dpo")
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    head = MLCHead.from_pretrained(args.extractor) if args.extractor else None
    mlc = _mlc_arguments(args)
    result = evaluate(model, tokenizer, records, mlc, head)
    print(format_eval({"model": result}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_eval({"model": result}, out / "eval.png")
    (out / "eval.json").write_text(json.dumps(result, indent=1))


def cmd_demo(args) -> None:
    from .transfer.demo import run_demo

    run_demo(args.out, steps=args.steps, seed=args.seed, mlc_weight=args.mlc_weight)


def cmd_transfer(args) -> None:
    from .transfer.experiment import run_from_args

    run_from_args(args)


def _add_mlc_options(p) -> None:
    p.add_argument("--languages", default=",".join(LANGUAGES), help="comma list; the first is the base language")
    p.add_argument("--mlc-weight", type=float, default=0.1)
    p.add_argument("--mlc-tau", type=float, default=1.0)
    p.add_argument("--mlc-layer", type=int, default=None, help="decoder layer k (default: the middle)")
    p.add_argument("--mlc-objective", default="sv_softmax")
    p.add_argument("--mlc-rep-size", type=int, default=256)
    p.add_argument("--mlc-impl", default="auto")
    p.add_argument("--no-generation-prompt", action="store_true", help="last prompt token without the assistant header")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train with an alignment loss + MLC")
    p_train.add_argument("--model", required=True, help="local path or hub id")
    p_train.add_argument("--dataset", default="sample", help="JSONL path, or 'sample' (embedded set)")
    p_train.add_argument("--algorithm", default="dpo", help=f"one of {ALGORITHMS}")
    p_train.add_argument("--output-dir", required=True)
    p_train.add_argument("--max-steps", type=int, default=100)
    p_train.add_argument("--batch-size", type=int, default=8, help="prompts per process and micro-batch")
    p_train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p_train.add_argument("--learning-rate", type=float, default=5e-6)
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p_train.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint-N folder, or 'last'")
    p_train.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (or use accelerate launch)")
    p_train.add_argument("--liger-kernels", action="store_true", help="Liger's RMSNorm/RoPE/SwiGLU kernels (CUDA)")
    _add_mlc_options(p_train)
    p_eval = sub.add_parser("eval", help="per-language consistency table")
    p_eval.add_argument("--model", required=True)
    p_eval.add_argument("--extractor", default=None, help="an MLCHead folder (mlc_head/ of a checkpoint)")
    p_eval.add_argument("--prompts", default="sample", help="JSONL path, or 'sample'")
    p_eval.add_argument("--split", default="heldout")
    p_eval.add_argument("--out", default=".")
    _add_mlc_options(p_eval)
    p_demo = sub.add_parser("demo", help="the offline demo (shipped world-v2 model: DPO vs DPO+MLC, CPU)")
    p_demo.add_argument("--out", default="mlc_demo")
    p_demo.add_argument("--steps", type=int, default=120)
    p_demo.add_argument("--mlc-weight", type=float, default=None, help="default: the pre-registered rule's")
    p_demo.add_argument("--seed", type=int, default=0)
    p_transfer = sub.add_parser("transfer", help="cross-lingual transfer of base-language alignment (synthetic world)")
    p_transfer.add_argument("--quick", action="store_true", help="3 seeds, 64+64 prompts per language (< 10 min)")
    p_transfer.add_argument("--out", default="transfer_out", help="folder for the table, CSV, JSON and PNG")
    p_transfer.add_argument("--cache-dir", default=None, help="checkpoint cache (~/.cache/mlc_kernels/transfer)")
    p_transfer.add_argument("--no-cache", action="store_true", help="pretrain afresh and keep nothing")
    p_transfer.add_argument("--seeds", default=None, help="comma list of alignment seeds (quick: 0,1,2; full: 0..4)")
    p_transfer.add_argument("--mlc-layer", type=int, default=None, help="decoder layer k (default 2 of 4)")
    p_transfer.add_argument("--mlc-weight", type=float, default=None, help="MLC weight (default 1.0)")
    p_transfer.add_argument("--mlc-tau", type=float, default=None, help="MLC temperature (default 1.0)")
    p_transfer.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p_transfer.add_argument("--world", default="v2", help="v2 (default: code-switching world, gate) or v1")
    p_transfer.add_argument("--world-seed", type=int, default=None, help="world and pretraining seed (default 0)")
    sub.add_parser("bench", help="kernel benchmarks (mlc-bench)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .benchmarks.runner import main as bench_main

        bench_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "transfer": cmd_transfer}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
