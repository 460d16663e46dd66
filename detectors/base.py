"""The one interface every detector implements (scikit-learn style).

``fit`` learns from reference (benign) data where the detector learns at all; ``score`` maps a
batch to one float per item, higher = more suspicious. Thresholds live in config, never in the
detector, so the same fitted detector serves monitor and enforce alike.
"""
from __future__ import annotations

import abc
import dataclasses
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


@dataclasses.dataclass
class ResponseResult:
    """What a response stage found in the upstream's answer."""
    score: float
    reasons: list[str] = dataclasses.field(default_factory=list)
    #: Extra response parameters to return (e.g. ``bastion.certified_radius``).
    parameters: dict[str, float | int | str | bool] = dataclasses.field(default_factory=dict)
    #: Refuse the answer regardless of thresholds: (gRPC status code name, reason code), e.g.
    #: randomized smoothing abstaining. In monitor mode this only annotates.
    refusal: tuple[str, str] | None = None
    #: Flag the answer with this reason code regardless of thresholds (forwarded, annotated).
    flag: str | None = None
    #: Extra work this answer cost the upstream (squeezed variants, noisy samples), for metrics.
    extra_items: int = 0


class ResponseStage(abc.ABC):
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
