"""The bases of scoring stages: :class:`Detector` (the request half scores inputs) and
:class:`ResponseStage` (the response half reads the model's answer), both a
:class:`~bastion.core.stage.Stage`.

``fit`` learns from reference (benign) data where the detector learns at all; ``score`` maps a
batch to one float per item, higher = more suspicious. Thresholds live in config, never in the
detector, so the same fitted detector serves monitor and enforce alike.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from bastion.core.stage import ResponseResult, Stage, StageOutcome, StageView
from bastion.transforms.base import TEXT_DATATYPES

__all__ = ["Detector", "ResponseResult", "ResponseStage", "TextDetector", "as_text"]


class Detector(Stage, abc.ABC):
    """A stage whose request half scores items: each text element of a text input, or each
    whole tensor; the stage's score is the highest item's, its reasons that item's."""
    #: v2 datatypes of the inputs this detector scores.
    accepts: ClassVar[frozenset[str]]
    #: True for detectors that score through a MicroBatcher (ONNX models): the pipeline then
    #: awaits ``ascore`` on the event loop instead of calling ``score`` inline.
    is_async: ClassVar[bool] = False

    def on_request(self, view: StageView) -> StageOutcome:
        items = self._items(view)
        return self._outcome(items, self.score(items)) if items else StageOutcome()

    async def aon_request(self, view: StageView) -> StageOutcome:
        items = self._items(view)
        return self._outcome(items, await self.ascore(items)) if items else StageOutcome()

    def _items(self, view: StageView) -> list:
        text = self.accepts == TEXT_DATATYPES
        items: list = []
        for values in view.values.values():
            items.extend(list(values.reshape(-1)) if text else [values])
        return items

    def _outcome(self, items: list, scores) -> StageOutcome:
        scores = np.asarray(scores, dtype=np.float64)
        worst = int(np.argmax(scores))
        score = float(scores[worst])
        return StageOutcome(score, self.reasons(items[worst]) if score > 0 else [],
                            worst_text=items[worst] if isinstance(items[worst], str) else None)

    async def ascore(self, batch: Sequence[Any]) -> np.ndarray:
        """Async scoring (batched detectors override this); the default calls ``score``."""
        return self.score(batch)

    def fit(self, reference: Any) -> "Detector":
        """Learn from benign reference data. Rule-based detectors need nothing."""
        return self

    @abc.abstractmethod
    def score(self, batch: Sequence[Any]) -> np.ndarray:
        """One float per item; higher is more suspicious. ``reasons(item)`` (Stage) names why."""


class TextDetector(Detector):
    accepts = TEXT_DATATYPES


class ResponseStage(Stage, abc.ABC):
    """A stage that needs the model's answer (Envoy's response filters): it may change the
    request before it is forwarded (ask for an extra output, batch squeezed variants), make
    extra upstream calls, score the response, and rewrite it before the client sees it.

    ``prepare`` runs after the request stages, on the request about to be forwarded, and
    returns whatever ``on_response`` needs later; both must be free of per-call instance state.
    """
    accepts: ClassVar[frozenset[str]]

    @abc.abstractmethod
    def prepare(self, request, inputs: dict[str, np.ndarray], request_id: str) -> Any:
        """Modify ``request`` (a ModelInferRequest) in place; return state for on_response."""

    @abc.abstractmethod
    async def on_response(self, state: Any, response, call_upstream) -> ResponseResult:
        """Score ``response`` (a ModelInferResponse, modified in place to what the client gets).
        ``await call_upstream(request)`` sends an extra ModelInferRequest upstream."""


def as_text(item: Any) -> str:
    """A text element as str (BYTES tensors hold bytes; undecodable bytes are replaced)."""
    if isinstance(item, str):
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item).decode("utf-8", "replace")
    return str(item)
