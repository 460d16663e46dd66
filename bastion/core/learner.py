"""The one way a stage learns: the :class:`Learner` base.

A stage that must see benign reference data before it can score (a kNN over embeddings, class
Gaussians over a model's hidden layer) inherits :class:`Learner`: ``fit(reference)`` returns the
stage itself, ``save()`` writes the fitted state where the stage's options say and returns that
path. ``bastion calibrate`` fits a stage because it *is* a Learner (``isinstance``), never by
probing attributes; what ``reference`` holds is the stage's to say (texts for a text detector,
a :class:`FeatureReference` for a stage that reads the upstream's outputs). What ``fit``
learned lives in attributes ending in ``_`` (scikit-learn's convention: ``detector_``,
``n_texts_``; the anomaly models' ``dim_``, ``whitener_``, ``reference_``, ...), so it never
reads as an option.

Learners trained offline by a tool (the bundled classifier, the n-gram model) are not stages'
Learners: the stage only loads their file.
"""
from __future__ import annotations

import abc
import dataclasses
import pathlib
from typing import Any

import numpy as np

__all__ = ["Learner", "FeatureReference", "is_learner"]


class Learner(abc.ABC):
    """A stage fitted on benign reference data before it scores (see the module docstring)."""

    @abc.abstractmethod
    def fit(self, reference: Any) -> "Learner":
        """Fit on benign ``reference`` data; return self."""

    @abc.abstractmethod
    def save(self) -> pathlib.Path:
        """Write the fitted state to the stage's state path; return the path."""


@dataclasses.dataclass(frozen=True)
class FeatureReference:
    """Benign reference rows for a stage that scores the upstream's outputs: ``features``
    [n, ...] of one output, ``classes`` per row (labels or the model's predictions; None for
    class-free models) and ``source`` (``upstream:MODEL:OUTPUT``, recorded in the state)."""

    features: np.ndarray
    classes: np.ndarray | None
    source: str


def is_learner(stage: object) -> bool:
    return isinstance(stage, Learner)
