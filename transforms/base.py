"""The base of input transforms: a :class:`~bastion.core.stage.Stage` whose request half
rewrites inputs.

A transform is pure: it takes one input tensor and returns a new one plus how many elements (or
characters, for text) it changed. That count is a signal in its own right (a prompt with 40
Unicode tag characters is an attack, not a typo), so the policy can put a threshold on it.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import numpy as np

from bastion.core.stage import Stage, StageOutcome, StageView

TEXT_DATATYPES = frozenset({"BYTES"})
NUMERIC_DATATYPES = frozenset({"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                               "INT32", "INT64", "FP16", "FP32", "FP64", "BF16"})
FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})


class InputRejected(ValueError):
    """An input breaks a rule (a cap, a range, a dtype): the request ends with INVALID_ARGUMENT.

    The message names the input and the rule and is shown to the client, so it must never
    contain the input's data.
    """


@dataclasses.dataclass
class TransformResult:
    array: np.ndarray
    #: How many characters (text) or elements (tensors) were changed, removed or inserted, by
    #: category (e.g. {"tag_chars": 40, "zero_width": 2}); the stage's score is their sum.
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(self.counts.values())


class TransformContext:
    """What a transform may know about the request besides the tensor (never client identity)."""

    def __init__(self, request_id: str, input_name: str, datatype: str):
        self.request_id = request_id
        self.input_name = input_name
        self.datatype = datatype


class Transform(Stage, abc.ABC):
    #: v2 datatypes this transform accepts; config wiring it to another input is rejected.
    accepts: ClassVar[frozenset[str]]

    @abc.abstractmethod
    def apply(self, array: np.ndarray, ctx: TransformContext) -> TransformResult:
        """Return the transformed array and what changed; raise InputRejected on a rule break."""

    def on_request(self, view: StageView) -> StageOutcome:
        """Apply to each targeted input; the score is how many characters/elements changed,
        the reasons the change categories (``<stage id>:<category>``)."""
        outcome = StageOutcome()
        total = 0
        for name, value in view.values.items():
            result = self.apply(value, TransformContext(view.request_id, name,
                                                        view.datatypes[name]))
            if result.changed:
                outcome.replacements[name] = result.array
                total += result.changed
                outcome.reasons.extend(f"{view.stage_id}:{k}" for k in sorted(result.counts))
        outcome.score = float(total)
        return outcome


class TextTransform(Transform):
    """A transform over text prompts: applied to every UTF-8 element of a BYTES tensor."""
    accepts = TEXT_DATATYPES

    @abc.abstractmethod
    def apply_text(self, text: str) -> tuple[str, dict[str, int]]:
        """Return (new text, characters changed/removed/inserted by category)."""

    def apply(self, array: np.ndarray, ctx: TransformContext) -> TransformResult:
        # Text stages receive decoded str elements (the pipeline decodes UTF-8 once per request).
        out = np.empty(array.shape, dtype=object)
        counts: dict[str, int] = {}
        flat_in, flat_out = array.reshape(-1), out.reshape(-1)
        for index, text in enumerate(flat_in):
            flat_out[index], item_counts = self.apply_text(text)
            for key, value in item_counts.items():
                if value:
                    counts[key] = counts.get(key, 0) + value
        return TransformResult(out, counts)
