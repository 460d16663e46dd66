"""The one interface every detector implements (scikit-learn style).

``fit`` learns from reference (benign) data where the detector learns at all; ``score`` maps a
batch to one float per item, higher = more suspicious. Thresholds live in config, never in the
detector, so the same fitted detector serves monitor and enforce alike.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from bastion.transforms.base import TEXT_DATATYPES


class Detector(abc.ABC):
    #: v2 datatypes of the inputs this detector scores.
    accepts: ClassVar[frozenset[str]]
    #: True for detectors that score through a MicroBatcher (ONNX models): the pipeline then
    #: awaits ``ascore`` on the event loop instead of calling ``score`` inline.
    is_async: ClassVar[bool] = False

    async def ascore(self, batch: Sequence[Any]) -> np.ndarray:
        """Async scoring (batched detectors override this); the default calls ``score``."""
        return self.score(batch)

    def fit(self, reference: Any) -> "Detector":
        """Learn from benign reference data. Rule-based detectors need nothing."""
        return self

    @abc.abstractmethod
    def score(self, batch: Sequence[Any]) -> np.ndarray:
        """One float per item; higher is more suspicious."""

    def reasons(self, item: Any) -> list[str]:
        """Short reason codes for one item (e.g. ``signature:ignore_previous``); never raw input."""
        return []


class TextDetector(Detector):
    accepts = TEXT_DATATYPES
