"""The synthetic-world transfer experiment's history: its record (``WORLD_CARD.md``), the retired v1 protocol
(:mod:`.v1`), the settings study (:mod:`.study`), world v2's research steps (:mod:`.v2`: gate, weight rule, run
cache), the tool that writes the shipped checkpoint (:mod:`.ship`) and the measured outputs (``results/``).

They import the library :mod:`mlc_kernels.transfer`; nothing there imports them.
"""
