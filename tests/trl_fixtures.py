"""Mini TRL fixtures shared by the trainer tests and the distributed worker: a word-level tokenizer with a
chat template, a 4-layer Qwen2 model from a config (random init) and prompt records with translations."""

from __future__ import annotations

import datasets
import torch
import transformers

LANGS = ("en", "zh", "sw")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tk.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
        "{% else %}<|assistant|> {{ m['content'] }} <eos> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return tk


def tiny_model(vocab: int):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config)


def records(kind: str, n: int = 8, missing_zh: tuple[int, ...] = ()) -> datasets.Dataset:
    """``n`` records of ``kind`` (dpo: chosen/rejected, else completion); record i has no ``sw`` translation
    when i % 3 == 0 and no ``zh`` one when i is in ``missing_zh``."""
    rows = []
    for i in range(n):
        row = {
            "prompt": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}],
            "variants": {
                "zh": None if i in missing_zh else f"w{i + 20} w{i + 21}",
                "sw": None if i % 3 == 0 else f"w{i + 40} w{i + 41} w{i + 42}",
            },
        }
        if kind == "dpo":
            row["chosen"] = [{"role": "assistant", "content": "w4 w5"}]
            row["rejected"] = [{"role": "assistant", "content": f"w{i + 6}"}]
        else:
            row["completion"] = [{"role": "assistant", "content": "w4 w5"}]
        rows.append(row)
    return datasets.Dataset.from_list(rows)
