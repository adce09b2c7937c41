"""Recipe: your own training loop with Liger-Kernel's chunked fused-linear DPO loss plus the MLC term.

Liger's ``LigerFusedLinearDPOLoss`` (``liger_kernel.chunked_loss``, plain torch) computes DPO from the
last hidden states and the LM head weight in chunks, so the logits over the vocabulary are never stored;
the MLC term adds truncated variant passes at layer k and the fused linear MLC loss of ``MLCHead``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import model_and_tokenizer, parser  # noqa: E402
from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: E402

from mlc_kernels import MLCHead  # noqa: E402
from mlc_kernels.hf import variant_representations  # noqa: E402
from mlc_kernels.sample_data import LANGUAGES, load_sample  # noqa: E402
from mlc_kernels.trainers import MLCArguments, MLCCollator, add_variant_ids  # noqa: E402


def preference_batch(tokenizer, records):
    """input_ids / attention_mask / labels (2B, T): chosen rows then rejected rows, prompt tokens ignored."""
    rows, labels = [], []
    for key in ("chosen", "rejected"):
        for r in records:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                   add_generation_prompt=True, tokenize=False)  # fmt: skip
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(r[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(p_ids + a_ids)
            labels.append([-100] * len(p_ids) + a_ids)
    t = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (t - len(r)) for r in rows])
    lab = torch.tensor([x + [-100] * (t - len(x)) for x in labels])
    return ids, (ids != pad).long(), lab


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    model, tokenizer = model_and_tokenizer(args.model)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    records = load_sample("train", "dpo")
    mlc = MLCArguments(languages=LANGUAGES, weight=args.mlc_weight, layer=args.mlc_layer, rep_size=64)
    layer = mlc.check(model)
    model.add_module("mlc_head", MLCHead(model.config.hidden_size, mlc.rep_size))
    variant_ids = add_variant_ids(_as_dataset(records), tokenizer, mlc)["mlc_variant_ids"]
    dpo = LigerFusedLinearDPOLoss(beta=0.1, compiled=False, use_ref_model=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    history = []
    batch_size = 8
    for step in range(args.steps):
        start = (step * batch_size) % len(records)
        chunk = records[start : start + batch_size]
        ids, att, labels = preference_batch(tokenizer, chunk)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=att).last_hidden_state
        with torch.no_grad():
            ref_hidden = ref_model.get_decoder()(input_ids=ids, attention_mask=att).last_hidden_state
        dpo_loss = dpo(model.lm_head.weight, hidden[:, :-1], labels[:, 1:],
                       ref_input=ref_hidden[:, :-1], ref_weight=ref_model.lm_head.weight)[0]  # fmt: skip
        loss, mlc_value = dpo_loss, None
        if step % mlc.aux_every == 0:  # the MLC term on every aux_every-th step, as the trainers add it
            batch = MLCCollator(lambda ex: {}, tokenizer.pad_token_id)(
                [{"mlc_variant_ids": v} for v in variant_ids[start : start + batch_size]]
            )
            reps, mask = variant_representations(model, batch["mlc_input_ids"], batch["mlc_attention_mask"], layer,
                                                 batch["mlc_mask"])  # fmt: skip
            mlc_loss = model.mlc_head.loss(reps, mask, tau=mlc.tau, objective=mlc.objective)
            loss, mlc_value = dpo_loss + mlc.weight * mlc_loss, mlc_loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step + 1, "dpo_loss": dpo_loss.item(), "mlc_loss": mlc_value})
        print(history[-1])
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    model.mlc_head.save_pretrained(Path(args.output_dir) / "mlc_head")
    return history


def _as_dataset(records):
    import datasets

    return datasets.Dataset.from_list([{"prompt": r["prompt"], "variants": r["variants"]} for r in records])


if __name__ == "__main__":
    main()
