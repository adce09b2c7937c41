"""Cross-lingual transfer of safety alignment in a synthetic multilingual world (``mlc transfer``).

- :mod:`.world`: the world generated from a seed (languages, lexicons, texts, alignment and eval data);
- :mod:`.pretrain`: a tiny Qwen2-style model pretrained on it on CPU (cached);
- :mod:`.evaluation`: per-language safety and helpfulness on held-out prompts;
- :mod:`.experiment`: base-language DPO / SFT with and without MLC over seeds, the table and the plot.

The world's rules: ``WORLD_CARD.md`` next to this file.
"""
