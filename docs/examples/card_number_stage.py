"""A complete Bastion detector in one file (docs/extending.md walks through it).

It flags prompts that carry a payment card number: users paste them into chatbots, and an LLM
provider's logs are no place for them. A number counts only if it has 13-19 digits (spaces or
dashes allowed between groups) and passes the Luhn check, so order numbers and phone numbers
rarely trip it.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from stdnum import luhn

from bastion.core.registry import StageOptions, stage
from bastion.detectors.base import TextDetector

# 13-19 digits, optionally grouped by single spaces or dashes; word boundaries on both sides.
CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")


class CardNumberOptions(StageOptions):
    """Stage-specific options (the common ones, threshold/action/inputs/..., come for free)."""
    min_digits: int = 13


def _card_numbers(text: str, min_digits: int) -> int:
    count = 0
    for match in CANDIDATE.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if len(digits) >= min_digits and luhn.is_valid(digits):
            count += 1
    return count


@stage("example.card_number", "detector", CardNumberOptions)
class CardNumberDetector(TextDetector):
    """Score 1.0 when a prompt holds a Luhn-valid card number, else 0.0 (higher = worse)."""

    def __init__(self, options: CardNumberOptions):
        self.min_digits = options.min_digits

    @staticmethod
    def _text(item) -> str:
        return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)

    def score(self, batch: Sequence) -> np.ndarray:
        return np.array([1.0 if _card_numbers(self._text(item), self.min_digits) else 0.0
                         for item in batch])

    def reasons(self, item) -> list[str]:
        # Reason codes name the rule, never the input.
        return ["pii:card_number"] if _card_numbers(self._text(item), self.min_digits) else []
