"""The ``detect.embedding`` anomaly stage: how unusual a prompt's embedding is.

The embeddings come from the shared :class:`~bastion.detectors.encoder.Encoder`
(:mod:`bastion.detectors.encoder`: long texts as windows, micro-batching, the options shared by
the encoder stages); a text scores as its most anomalous window.

``detect.embedding`` {encoder, method: mahalanobis|knn|iforest, k, state}: anomaly score of
the prompt's embedding against a benign reference (see :mod:`bastion.detectors.anomaly`).
``bastion calibrate`` fits it (a :class:`~bastion.core.learner.Learner`) and ``save()`` writes ``state``; the state
records the encoder's identity (name, variant, sha256 of the model file) and is refused by an
encoder it was not fitted with.
"""
from __future__ import annotations

import asyncio
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from bastion.core.learner import Learner
from bastion.core.registry import register
from bastion.detectors.anomaly import load_state, save_state
from bastion.detectors.anomaly_models import AnomalyModel, make_model
from bastion.detectors.anomaly_state import StateError
from bastion.detectors.base import TextDetector
from bastion.detectors.encoder import Encoder, EncoderStageOptions, _as_str

__all__ = ["EmbeddingAnomalyDetector", "EmbeddingOptions"]


class EmbeddingOptions(EncoderStageOptions):
    method: Literal["mahalanobis", "knn", "iforest"] = "mahalanobis"
    #: State file: written by ``bastion calibrate`` (save()), read when the stage is built.
    state: str
    k: int = Field(default=10, ge=1)
    reduce: Literal["mean", "kth"] = "mean"
    n_estimators: int = Field(default=200, ge=1)
    seed: int = 0


class EmbeddingAnomalyDetector(TextDetector, Learner):
    """Anomaly score of a text's embedding (its most anomalous window) against benign texts;
    a Learner: ``bastion calibrate`` fits it on benign texts."""

    is_async = True

    def __init__(self, encoder: Encoder, model: AnomalyModel, state: str | os.PathLike | None):
        self.encoder = encoder
        self.model = model
        self.state = pathlib.Path(state) if state is not None else None

    @classmethod
    def from_options(cls, options: EmbeddingOptions,
                     encoder: Encoder | None = None) -> "EmbeddingAnomalyDetector":
        encoder = encoder or options.get_encoder()
        state = pathlib.Path(options.state)
        if state.exists():
            model, _ = load_state(state, source=encoder.identity, method=options.method)
        else:  # not fitted yet: `bastion calibrate` fits it and writes the state
            model = make_model(options.method, k=options.k, reduce=options.reduce,
                               n_estimators=options.n_estimators, seed=options.seed)
        return cls(encoder, model, state)

    # -- fitting -------------------------------------------------------------------------------

    def features(self, texts: Sequence[str]) -> np.ndarray:
        windows = self.encoder.embed(list(texts))
        return np.concatenate(windows) if windows else np.zeros((0, self.encoder.dim))

    def fit(self, reference: Sequence[str]) -> "EmbeddingAnomalyDetector":
        texts = [_as_str(t) for t in reference]
        self.model.fit(self.features(texts))
        self.n_texts_ = len(texts)
        return self

    def save(self, path: str | os.PathLike | None = None) -> pathlib.Path:
        target = pathlib.Path(path) if path is not None else self.state
        if target is None:
            raise ValueError("no state path to save to")
        return save_state(target, self.model, self.encoder.identity,
                          extra={"texts": getattr(self, "n_texts_", None),
                                 "max_chunks": self.encoder.options.max_chunks})

    # -- scoring -------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self.model.fitted:
            raise RuntimeError(f"detect.embedding: no fitted state at {self.state} (run "
                               "`bastion calibrate` for this stage)")

    def _scores(self, windows: list[np.ndarray]) -> np.ndarray:
        flat = self.model.score(np.concatenate(windows))
        out, position = np.empty(len(windows)), 0
        for index, w in enumerate(windows):
            out[index] = flat[position:position + len(w)].max()
            position += len(w)
        return out

    def score(self, batch: Sequence[Any]) -> np.ndarray:
        self._check_fitted()
        if not len(batch):
            return np.zeros(0)
        return self._scores(self.encoder.embed([_as_str(t) for t in batch]))

    async def ascore(self, batch: Sequence[Any]) -> np.ndarray:
        self._check_fitted()
        if not len(batch):
            return np.zeros(0)
        windows = await self.encoder.aembed_many([_as_str(t) for t in batch])
        if self.model.heavy:
            return await asyncio.to_thread(self._scores, windows)
        return self._scores(windows)

    def reasons(self, item: Any) -> list[str]:
        return [f"embedding:{self.model.method}"]


def build_embedding_detector(options: EmbeddingOptions) -> EmbeddingAnomalyDetector:
    try:
        detector = EmbeddingAnomalyDetector.from_options(options)
    except StateError as err:
        raise ValueError(f"state: {err}") from None
    detector.loaded_files = detector.encoder.files
    return detector


register("detect.embedding", "detector", EmbeddingOptions, build_embedding_detector)
