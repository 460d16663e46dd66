"""``detect.ngram``: a linear model over character and word n-grams scores each prompt.

The model (:class:`~bastion.detectors.ngram_model.NgramClassifier`) is trained by
``tools/training/train_prompt_ngram.py``; the one the package ships is
``bastion/models/prompt-ngram/ngram.npz``. It reads the text as the client sent it (obfuscation
is evidence) and needs no encoder pass (about 2 ms of CPU per prompt in bench/bench_text_profile.py,
a quarter of the llm-prompt profile's). It is not in that profile: held out by source, its
thresholds do not transfer to benign registers it never saw (docs/quality-prompt-guard.md);
it is for traffic whose benign kinds it was trained on (docs/tuning.md).

Score: the attack probability of the text's most suspicious window, in [0, 1]. Reason:
``ngram:attack`` (the model is binary; it never quotes the text).

Options: ``model`` (a saved ``.npz``; default: the bundled one).
"""
from __future__ import annotations

import importlib.resources
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from bastion.core.registry import StageOptions, register
from bastion.detectors.base import TextDetector, as_text
from bastion.detectors.ngram_model import NgramClassifier

__all__ = ["NgramDetector", "NgramOptions", "bundled_ngram_model"]

BUNDLED = ("models", "prompt-ngram", "ngram.npz")


def bundled_ngram_model() -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("bastion").joinpath(*BUNDLED)))


class NgramDetector(TextDetector):
    """Attack probability from the n-gram model; see the module docstring."""

    def __init__(self, model: NgramClassifier):
        self.model = model
        model.decision_function([""])  # import and build the vectorizers now, not on a request

    def score(self, batch: Sequence[Any]) -> np.ndarray:
        if not len(batch):
            return np.zeros(0)
        return self.model.predict_proba([as_text(t) for t in batch])[:, 1]

    def reasons(self, item: Any) -> list[str]:
        return ["ngram:attack"]


class NgramOptions(StageOptions):
    #: A model saved by NgramClassifier.save; None = the bundled prompt-ngram model.
    model: str | None = None


def build_ngram_detector(options: NgramOptions) -> NgramDetector:
    path = pathlib.Path(options.model) if options.model else bundled_ngram_model()
    try:
        detector = NgramDetector(NgramClassifier.load(path))
    except (FileNotFoundError, ValueError) as err:  # configuration errors name the option
        raise ValueError(f"model: {err}") from None
    detector.loaded_files = (path,)
    return detector


# Offloaded: a long prompt (16 windows of 2,000 characters) costs tens of milliseconds of
# pure-Python n-gram hashing, which must not stall the event loop.
register("detect.ngram", "detector", NgramOptions, build_ngram_detector, offload=True)
