"""Recipe: TRL SFT + MLC on the embedded sample set (python integrations/trl_sft_mlc.py --help)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import model_and_tokenizer, parser  # noqa: E402
from trl import SFTConfig  # noqa: E402

from mlc_kernels.sample_data import LANGUAGES, load_sample, to_dataset  # noqa: E402
from mlc_kernels.trainers import MLCArguments, SFTMLCTrainer  # noqa: E402


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    model, tokenizer = model_and_tokenizer(args.model)
    dataset = to_dataset(load_sample("train", "sft"), "sft")
    mlc = MLCArguments(languages=LANGUAGES, weight=args.mlc_weight, layer=args.mlc_layer, rep_size=64)
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
        learning_rate=args.learning_rate, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    trainer = SFTMLCTrainer(model=model, args=config, train_dataset=dataset,
                            processing_class=tokenizer, mlc_args=mlc)  # fmt: skip
    trainer.train()
    trainer.save_model(args.output_dir)  # the extractor goes to <output_dir>/mlc_head
    return trainer


if __name__ == "__main__":
    main()
