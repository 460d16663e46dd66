"""Feature-space anomaly detectors: fit on benign reference features, score new ones.

The models (``mahalanobis``, ``knn``, ``iforest``; one interface,
:class:`~bastion.detectors.anomaly_models.AnomalyModel`) are
:mod:`bastion.detectors.anomaly_models`; the checksummed file format their states are written
in is :mod:`bastion.detectors.anomaly_state`. This module saves and loads anomaly states, turns
input tensors into features (:func:`pool_features`) and holds the stages and the fit command.

Features come from one *source*, named by a string that the state records and that loading
checks: ``encoder:<name>:<variant>:sha256=<model file sha256>`` (the text encoder, see
:mod:`bastion.detectors.encoder`), ``input:<model>:<input>`` (the input tensor itself, e.g.
``input:fashion-mnist:image``), ``upstream:<model>:<output>`` (features the model returns, e.g.
``upstream:fashion-mnist:features``).

State files (``.npz``, no pickle): the fitted arrays plus ``__header__``, a JSON document with
the format name and version, the method and its parameters, the source, the feature dimension,
the sha256 of every array and a checksum over the header and the array digests. Loading refuses
(:class:`~bastion.detectors.anomaly_state.StateError`, naming the file and what is wrong) a
file of another format or version, from another source, for another method, with a changed
array or header.

Stages registered here: ``detect.input_anomaly`` scores the request's input tensor (flattened,
optionally average-pooled to ``pool`` x ``pool``). Fit its state with::

    python -m bastion.detectors.anomaly fit --features X.npy [--classes y.npy] --method knn \\
        --source input:fashion-mnist:image --pool 14 --out state.npz

(``--features`` is the raw inputs for an ``input:`` source: the pooling is applied as the stage
applies it.) :class:`FeatureAnomalyDetector` scores [batch, d] features the upstream returns,
with an optional predicted class per row; the response stage that asks the upstream for them,
``detect.features``, is :mod:`bastion.detectors.upstream_features`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from bastion.core.registry import StageOptions, register
from bastion.detectors.anomaly_models import (METHODS, MODEL_CLASSES, AnomalyModel, Method,
                                              as_2d, make_model)
from bastion.detectors.anomaly_state import StateError, read_state_file, write_state_file
from bastion.detectors.base import Detector
from bastion.transforms.base import NUMERIC_DATATYPES

__all__ = ["FORMAT", "VERSION", "save_state", "load_state", "pool_features",
           "FeatureAnomalyDetector", "InputAnomalyDetector", "InputAnomalyOptions"]

FORMAT = "bastion.anomaly-state"
VERSION = 1


# --------------------------------------------------------------------------------------------
# State files
# --------------------------------------------------------------------------------------------


def save_state(path: str | os.PathLike, model: AnomalyModel, source: str,
               extra: dict | None = None) -> pathlib.Path:
    """Write ``model``'s state (atomically: a temporary file renamed over ``path``)."""
    if not model.fitted:
        raise RuntimeError("cannot save an unfitted model")
    path = pathlib.Path(path)
    arrays = {name: np.array(a, order="C", copy=None) for name, a in model.arrays().items()}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "method": model.method,
        "params": model.params(),
        "source": source,
        "dim": model.dim_,
        "n_reference": model.n_reference_,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
    }
    return write_state_file(path, header, arrays)


def load_state(path: str | os.PathLike, source: str | None = None,
               method: str | None = None) -> tuple[AnomalyModel, dict]:
    """Load and verify a state file. ``source`` / ``method``: what the caller expects (refused
    when the file says otherwise). Returns the model and the header."""
    path = pathlib.Path(path)
    header, arrays = read_state_file(path, FORMAT, VERSION, "anomaly")
    if source is not None and header.get("source") != source:
        raise StateError(f"{path}: fitted on features from {header.get('source')!r}, but "
                         f"this stage's features come from {source!r}: refit the state "
                         "(bastion calibrate) or point the stage at the right one")
    if method is not None and header.get("method") != method:
        raise StateError(f"{path}: holds a {header.get('method')!r} model, the stage is "
                         f"configured for {method!r}")
    cls = MODEL_CLASSES.get(header.get("method"))
    if cls is None:
        raise StateError(f"{path}: unknown method {header.get('method')!r}")
    try:
        model = cls.from_state(header.get("params", {}), arrays, int(header["dim"]),
                               int(header.get("n_reference", 0)))
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"{path}: inconsistent state ({err})") from None
    return model, header


# --------------------------------------------------------------------------------------------
# Feature extraction from tensors
# --------------------------------------------------------------------------------------------


def pool_features(array: np.ndarray, pool: int | None = None) -> np.ndarray:
    """Rows of an input tensor as features: [n, ...] -> [n, d] float32.

    With ``pool``, the last two dimensions (H, W) are average-pooled to ``pool`` x ``pool``
    first (exact block means when H and W are multiples of ``pool``, area averaging otherwise).
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.float32)
    if array.ndim < 2:
        raise ValueError(f"input must have a batch dimension, got shape {list(array.shape)}")
    x = array.astype(np.float32, copy=False)
    if pool:
        if x.ndim < 3:
            raise ValueError(f"pool needs [n, ..., H, W] input, got shape {list(x.shape)}")
        h, w = x.shape[-2:]
        if pool > min(h, w):
            raise ValueError(f"pool {pool} is larger than the input's {h}x{w}")
        x = _area_resize(_area_resize(x, pool, axis=-2), pool, axis=-1)
    return x.reshape(len(x), -1)


def _area_resize(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    length = x.shape[axis]
    if length == size:
        return x
    if length % size == 0:
        shape = list(x.shape)
        axis = axis % x.ndim
        shape[axis:axis + 1] = [size, length // size]
        return x.reshape(shape).mean(axis=axis + 1)
    # overlap weights between input cells [i, i+1) and output cells [j*L/s, (j+1)*L/s)
    edges = np.arange(size + 1) * (length / size)
    cells = np.arange(length + 1, dtype=np.float64)
    weights = np.clip(np.minimum(cells[None, 1:], edges[1:, None])
                      - np.maximum(cells[None, :-1], edges[:-1, None]), 0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    moved = np.moveaxis(x, axis, -1)
    return np.moveaxis(moved @ weights.T.astype(np.float32), -1, axis)


# --------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------


class FeatureAnomalyDetector(Detector):
    """Scores [batch, d] feature arrays (e.g. the ``features`` output the upstream returns).

    ``score_features(features, predicted=None)`` gives one score per row; ``predicted`` (the
    model's predicted class per row, e.g. ``logits.argmax(1)``) is used by a class-conditional
    Mahalanobis model with ``class_mode: predicted``. ``score(batch)`` takes items that are
    arrays [n, d] (or [d]), or dicts ``{"features": ..., "predicted": ...}`` /
    ``{"features": ..., "logits": ...}``, and gives each item its worst row's score.
    """

    accepts = NUMERIC_DATATYPES

    def __init__(self, model: AnomalyModel, source: str):
        self.model = model
        self.source = source

    @classmethod
    def from_state(cls, path: str | os.PathLike, source: str,
                   method: str | None = None) -> "FeatureAnomalyDetector":
        model, _ = load_state(path, source=source, method=method)
        return cls(model, source)

    def score_features(self, features: Any, predicted: Any = None) -> np.ndarray:
        return self.model.score(as_2d(features), predicted)

    def score(self, batch: Sequence[Any]) -> np.ndarray:
        out = np.zeros(len(batch), dtype=np.float64)
        for index, item in enumerate(batch):
            predicted = None
            if isinstance(item, dict):
                features = item["features"]
                if item.get("predicted") is not None:
                    predicted = np.asarray(item["predicted"]).reshape(-1)
                elif item.get("logits") is not None:
                    logits = np.asarray(item["logits"])
                    predicted = logits.reshape(len(logits), -1).argmax(axis=1)
            else:
                features = item
            features = np.asarray(features)
            features = features.reshape(len(features), -1) if features.ndim > 1 else features
            scores = self.score_features(features, predicted)
            out[index] = float(scores.max()) if len(scores) else 0.0
        return out

    def reasons(self, item: Any) -> list[str]:
        return [f"anomaly:{self.model.method}"]


class InputAnomalyOptions(StageOptions):
    #: Method the state must hold (a mismatch is refused when the stage is built).
    method: Method = "mahalanobis"
    #: State file written by ``python -m bastion.detectors.anomaly fit`` (required).
    state: str
    #: Average-pool the last two dimensions to pool x pool before flattening (None = no pool).
    pool: int | None = Field(default=None, ge=1)
    #: Feature-source name recorded in the state: the stage's source is ``input:<source>``
    #: (e.g. ``fashion-mnist:image``) plus ``:pool=<pool>`` when pooling.
    source: str = "input"


def input_source(source: str, pool: int | None) -> str:
    name = source if source.startswith("input:") else f"input:{source}"
    return f"{name}:pool={pool}" if pool else name


class InputAnomalyDetector(Detector):
    """``detect.input_anomaly``: the input tensor itself (pooled, flattened) as features.

    Each item is one input tensor [n, ...]; its score is its most anomalous row's score.
    """

    accepts = NUMERIC_DATATYPES

    def __init__(self, model: AnomalyModel, pool: int | None, source: str):
        self.model = model
        self.pool = pool
        self.source = source

    def features(self, array: np.ndarray) -> np.ndarray:
        return pool_features(array, self.pool)

    def score(self, batch: Sequence[Any]) -> np.ndarray:
        out = np.zeros(len(batch), dtype=np.float64)
        for index, item in enumerate(batch):
            scores = self.model.score(self.features(np.asarray(item)))
            out[index] = float(scores.max()) if len(scores) else 0.0
        return out

    def reasons(self, item: Any) -> list[str]:
        return [f"anomaly:input:{self.model.method}"]


def build_input_anomaly(options: InputAnomalyOptions) -> InputAnomalyDetector:
    source = input_source(options.source, options.pool)
    if not pathlib.Path(options.state).exists():
        raise ValueError(f"state file {options.state} does not exist (fit it with "
                         "`python -m bastion.detectors.anomaly fit`)")
    model, _ = load_state(options.state, source=source, method=options.method)
    return InputAnomalyDetector(model, options.pool, source)


register("detect.input_anomaly", "detector", InputAnomalyOptions, build_input_anomaly,
         offload=True)


# --------------------------------------------------------------------------------------------
# CLI: python -m bastion.detectors.anomaly fit ...
# --------------------------------------------------------------------------------------------


def _load_array(path: str) -> np.ndarray:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            if len(data.files) != 1:
                raise SystemExit(f"{path}: expected one array, found {data.files}")
            return data[data.files[0]]
    return np.load(path, allow_pickle=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bastion.detectors.anomaly",
                                     description="fit an anomaly state file")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a state on reference features")
    fit.add_argument("--features", required=True, help=".npy / one-array .npz [n, ...]")
    fit.add_argument("--classes", help=".npy of class labels [n] (class-conditional)")
    fit.add_argument("--method", choices=METHODS, default="mahalanobis")
    fit.add_argument("--source", required=True,
                     help="feature source, e.g. input:fashion-mnist:image or "
                          "upstream:fashion-mnist:features")
    fit.add_argument("--pool", type=int, help="input sources: pool H, W to pool x pool")
    fit.add_argument("--k", type=int, default=10)
    fit.add_argument("--reduce", choices=("mean", "kth"), default="mean")
    fit.add_argument("--class-mode", choices=("min", "predicted"), default="min")
    fit.add_argument("--n-estimators", type=int, default=200)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", required=True)
    info = sub.add_parser("info", help="print a state file's header (verifies it)")
    info.add_argument("state")
    args = parser.parse_args(argv)
    if args.command == "info":
        try:
            _, header = load_state(args.state)
        except StateError as err:
            print(err, file=sys.stderr)
            return 1
        print(json.dumps(header, indent=2))
        return 0
    X = _load_array(args.features)
    source = args.source
    if source.startswith("input:") or args.pool:
        source = input_source(source, args.pool)
        X = pool_features(X, args.pool)
    else:
        X = X.reshape(len(X), -1)
    classes = _load_array(args.classes) if args.classes else None
    model = make_model(args.method, k=args.k, reduce=args.reduce, class_mode=args.class_mode,
                       n_estimators=args.n_estimators, seed=args.seed)
    model.fit(X, classes)
    path = save_state(args.out, model, source)
    print(f"{path}: {model.method} on {model.n_reference_} x {model.dim_} features from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
