"""Cross-lingual transfer of safety alignment in a synthetic multilingual world (``mlc demo``, ``mlc transfer``).

The library, each module importing only those above it:

- :mod:`.world`: the world generated from a seed (languages, lexicons, texts, alignment and eval data);
- :mod:`.pretrain`: a tiny Qwen2-style model pretrained on it on CPU (cached), the shipped checkpoint;
- :mod:`.evaluation`: per-language safety and helpfulness on held-out prompts;
- :mod:`.align`: one alignment run (DPO / SFT, with or without MLC) and the layer-k consistency;
- :mod:`.gate`: the pre-condition gate measured on a pretrained model;
- :mod:`.runs`: runs as tasks (one run and its evaluation, the per-run cache, parallel processes);
- :mod:`.report`: tables, CSV, plots, a progress bar;
- :mod:`.options`: the command-line options the protocols share.

On top: world v2's protocol as data (:mod:`.protocol`), its comparison (:mod:`.v2`, ``mlc transfer``) and the demo
(:mod:`.demo`, ``mlc demo``). The experiment's record and history (the card, v1, the studies, the research steps,
results) live in the repository under ``experiments/transfer/``.
"""
