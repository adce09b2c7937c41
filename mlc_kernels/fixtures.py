"""The offline demo fixtures: a tokenizer trained in memory and a mini Qwen2-style model (random init).

Used by the tests, the integration recipes and the benchmarks; no network, no files.
"""

from __future__ import annotations

import torch

from .sample_data import load_sample


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
