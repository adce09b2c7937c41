"""One process of the distributed tests (run by ``torchrun``, ``accelerate launch`` or plainly).

- ``trainer``: one optimizer step of ``DPOMLCTrainer`` on the first ``per_device x processes x accumulation``
  records in order; rank 0 saves the logged loss and the synchronised gradients (model and extractor),
  taken right before the optimizer step, to ``--out``. Whatever engine wraps the model (none, DDP, FSDP
  via accelerate) the files must agree.
- ``fsdp2``: the same loss (causal LM loss + MLC term with the global-batch mean) on a model sharded with
  FSDP2's ``fully_shard`` (decoder layers, extractor, root), the engine accelerate uses for FSDP2, on the
  CPU with gloo; saves the loss and the full (unsharded) gradients.

Records 2 and 3 miss the ``zh`` translation and record 3 the ``sw`` one too: the processes see different
numbers of MLC-eligible prompts, so a per-process mean would not match the single-process mean.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from trl_fixtures import LANGS, records, tiny_model, tiny_tokenizer  # noqa: E402

MISSING_ZH = (2, 3)


def full_gradients(model: torch.nn.Module, deepspeed: bool = False) -> dict[str, torch.Tensor]:
    """Parameter name -> full gradient on the CPU (DTensor shards of FSDP2 gathered; DeepSpeed ZeRO's
    partitioned gradients gathered with its own ``safe_get_full_grad``)."""
    grads = {}
    for name, p in model.named_parameters():
        if deepspeed:
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if g is None:
            continue
        grads[name.replace("_fsdp_wrapped_module.", "")] = g.detach().float().cpu().clone()
    return grads


def run_trainer(args) -> None:
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    from mlc_kernels.trainers import MLCArguments, trl_classes

    trainer_cls, config_cls = trl_classes("dpo")

    class InOrder(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            if args.shuffle:
                return super()._get_train_sampler(train_dataset)
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    captured: dict = {}

    class CaptureGradients(TrainerCallback):
        def on_pre_optimizer_step(self, targs, state, control, **kwargs):
            if args.deepspeed is None:
                captured["grads"] = full_gradients(trainer.model)

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == args.stop_at:
                control.should_training_stop = True

    if args.deepspeed is not None:  # accelerate runs DeepSpeed's step inside backward: take the gradients there
        from deepspeed.runtime.engine import DeepSpeedEngine

        engine_step = DeepSpeedEngine.step

        def step_capturing_gradients(engine, *step_args, **step_kwargs):
            if engine.is_gradient_accumulation_boundary():
                captured["grads"] = full_gradients(engine.module, deepspeed=True)
            return engine_step(engine, *step_args, **step_kwargs)

        DeepSpeedEngine.step = step_capturing_gradients

    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    config = config_cls(
        output_dir=args.output_dir, per_device_train_batch_size=args.per_device, max_steps=args.max_steps,
        gradient_accumulation_steps=args.accumulation, learning_rate=1e-3, max_grad_norm=0.0, logging_steps=1,
        report_to=[], save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, seed=0,
        use_cpu=args.device == "cpu", beta=0.1,
        max_length=32, dataloader_drop_last=True, bf16=False, deepspeed=args.deepspeed,
    )  # fmt: skip
    # weight 0.5: a weight dropped from one path (the gradient cache's early backward under DDP) changes the step
    mlc = MLCArguments(languages=LANGS, weight=0.5, layer=2, rep_size=8, impl=args.impl, grad_cache=args.grad_cache,
                       aux_every=1)  # fmt: skip
    trainer = InOrder(
        model=model, ref_model=tiny_model(len(tokenizer)), args=config, processing_class=tokenizer,
        train_dataset=records("dpo", missing_zh=MISSING_ZH), mlc_args=mlc, callbacks=[CaptureGradients()],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=args.resume)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    weights = {k: v.detach().cpu().clone() for k, v in unwrapped.named_parameters()}
    if trainer.accelerator.is_main_process:
        torch.save({"loss": losses[0], "losses": losses, "grads": captured["grads"], "weights": weights,
                    "world": trainer.accelerator.num_processes, "step": trainer.state.global_step,
                    "engine": trainer.accelerator.distributed_type.value,
                    "head_class": type(trainer.model.mlc_head).__name__}, args.out)  # fmt: skip
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group: no gloo thread dies with the interpreter


def run_fsdp2(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mlc_kernels import MLCHead
    from mlc_kernels.hf import variant_representations
    from mlc_kernels.trainers import MLCArguments, MLCCollator, add_variant_ids

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    torch.manual_seed(1)
    model.add_module("mlc_head", MLCHead(model.config.hidden_size, 8))
    mlc = MLCArguments(languages=LANGS, weight=1.0, layer=2, rep_size=8, impl=args.impl)
    data = add_variant_ids(records("dpo", missing_zh=MISSING_ZH), tokenizer, mlc)
    n = 4 // world
    rows = [data[i] for i in range(rank * n, rank * n + n)]

    def lm_inputs(row) -> list[int]:
        return tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)

    texts = tokenizer([lm_inputs(r) for r in rows], padding=True, return_tensors="pt")
    collate = MLCCollator(lambda examples: {}, tokenizer.pad_token_id)
    batch = collate([{"mlc_variant_ids": r["mlc_variant_ids"]} for r in rows])
    labels = texts["input_ids"].masked_fill(texts["attention_mask"] == 0, -100)
    counts = torch.stack([(batch["mlc_mask"].sum(dim=1) >= 2).sum(), (labels[:, 1:] != -100).sum()])
    if distributed:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.mlc_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        dist.all_reduce(counts)
    logits = model(**texts).logits[:, :-1].float()
    lm_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    reps, mask = variant_representations(model, batch["mlc_input_ids"], batch["mlc_attention_mask"], 2,
                                         batch["mlc_mask"])  # fmt: skip
    mlc_sum = model.mlc_head(reps, mask, loss=True, reduction="sum", impl=args.impl)
    # token mean and prompt mean over the global batch; gradients are averaged over the processes
    loss = (lm_sum / counts[1] + mlc.weight * mlc_sum / counts[0].clamp_min(1)) * world
    loss.backward()
    total = loss.detach().clone()
    if distributed:
        dist.all_reduce(total)
        total /= world
    grads = full_gradients(model)
    if rank == 0:
        torch.save({"loss": total.item(), "grads": grads, "world": world}, args.out)
    if distributed:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["trainer", "fsdp2"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--per-device", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--impl", default="torch")
    parser.add_argument("--grad-cache", action="store_true", help="trainer mode: MLCArguments.grad_cache")
    parser.add_argument("--max-steps", type=int, default=1)
    parser.add_argument("--save-steps", type=int, default=0, help="trainer mode: checkpoint every N steps")
    parser.add_argument("--stop-at", type=int, default=0, help="trainer mode: stop after this step")
    parser.add_argument("--resume", default=None, help="trainer mode: resume from this checkpoint")
    parser.add_argument("--shuffle", action="store_true", help="trainer mode: the trainer's own shuffled sampler")
    parser.add_argument("--deepspeed", default=None, help="trainer mode: a DeepSpeed JSON config")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="trainer mode: where to train")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    args.output_dir = args.output_dir or str(Path(args.out).parent / "run")
    {"trainer": run_trainer, "fsdp2": run_fsdp2}[args.mode](args)


if __name__ == "__main__":
    main()
