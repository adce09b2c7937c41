"""A whole DPO training step with and without the MLC term (``mlc-bench --suite train-step``).

Mini Qwen2-style model of realistic proportions (hidden 512, 8 layers, vocabulary 151,936), 8 prompts of
about 32 tokens with 64-token responses, m=10 variants, k=4. Variants: DPO alone; DPO+MLC with the plain
truncated variant passes; DPO+MLC with the gradient cache. A step is TRL's ``compute_loss``, ``backward``
and an AdamW step (a reference model forward included, as DPO needs it).
"""

from __future__ import annotations

import copy

import torch

STEP_CONFIG = dict(
    vocab_size=151936, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256,
)  # fmt: skip
VARIANTS = ("dpo", "dpo+mlc", "dpo+mlc+grad_cache")


class _Tokenizer:
    """Stands in for a tokenizer: fixed-length random token ids, enough for TRL's DPO data path."""


def build(variant: str, n_prompts: int = 8, prompt_len: int = 32, response_len: int = 64, m: int = 10, seed: int = 0):
    """(trainer, model, optimizer, batch) for one variant; inputs are pre-tokenised random ids."""
    import transformers
    import trl

    from mlc_kernels.sample_data import LANGUAGES
    from mlc_kernels.trainers import MLCCollator, trl_classes

    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**STEP_CONFIG))
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = STEP_CONFIG["vocab_size"]
    prompt = torch.randint(4, vocab, (n_prompts, prompt_len), generator=gen)
    chosen = torch.randint(4, vocab, (n_prompts, response_len), generator=gen)
    rejected = torch.randint(4, vocab, (n_prompts, response_len), generator=gen)
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    completion = torch.zeros_like(ids)
    completion[:, prompt_len:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(), pad_token="<pad>", eos_token="<eos>"
    )
    common = dict(output_dir="/tmp/mlc_train_step", report_to=[], use_cpu=not torch.cuda.is_available(),
                  per_device_train_batch_size=n_prompts)  # fmt: skip
    dummy = _dummy_dataset()
    if variant == "dpo":
        trainer = trl.DPOTrainer(model=model, ref_model=ref, args=trl.DPOConfig(**common), train_dataset=dummy,
                                 processing_class=tokenizer)  # fmt: skip
    else:
        from mlc_kernels.trainers import MLCArguments

        trainer_cls, config_cls = trl_classes("dpo")
        mlc = MLCArguments(languages=LANGUAGES[:m], weight=0.1, layer=4, rep_size=256, impl="auto",
                           grad_cache=variant.endswith("grad_cache"), chunk_prompts=1)  # fmt: skip
        trainer = trainer_cls(model=model, ref_model=ref, args=config_cls(**common), train_dataset=dummy,
                              processing_class=tokenizer, mlc_args=mlc)  # fmt: skip
        variants = torch.randint(4, vocab, (n_prompts, m, prompt_len), generator=gen)
        mlc_batch = MLCCollator(lambda ex: {}, 0)([{"mlc_variant_ids": v.tolist()} for v in variants])
        batch.update(mlc_batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return trainer, model.train(), optimizer, batch


def step(trainer, model, optimizer, batch) -> None:
    """One training step: loss, backward, optimizer step."""
    inputs = dict(batch)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def _byte_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))


def _dummy_dataset():
    import datasets

    return datasets.Dataset.from_list(
        [{"prompt": "a", "chosen": "b", "rejected": "c", "variants": {"zh": "d"}} for _ in range(2)]
    )
