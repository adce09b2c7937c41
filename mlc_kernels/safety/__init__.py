"""Per-language safety of generated answers (``mlc safety``): the prompts (:mod:`.inputs`, one reader for this
package's JSONL, the LLaMA-Factory JSON, the MultiJail CSV and PKU-SafeRLHF-style JSONL), greedy batched answers
(:mod:`.generate`), the judges that call an answer refused or not (:mod:`.judges`, one registry) and the
per-language table with bootstrap intervals (:mod:`.report`)."""

from __future__ import annotations

from .generate import generate_answers
from .inputs import PromptRow, read_prompts

__all__ = ["PromptRow", "generate_answers", "read_prompts"]
