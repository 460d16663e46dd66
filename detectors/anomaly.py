"""Feature-space anomaly detectors: fit on benign reference features, score new ones.

One interface, :class:`AnomalyModel` (``fit(X, classes=None)``, ``score(X, classes=None)``,
higher = more anomalous), three methods, all scikit-learn based:

``mahalanobis``
    Gaussian with a Ledoit-Wolf shrunk covariance (``sklearn.covariance.LedoitWolf``). Fitted
    with ``classes`` it is class-conditional (Lee et al., NeurIPS 2018): one mean per class, one
    covariance shared by all classes (fitted on the class-centred data). The score is the
    Mahalanobis distance to the nearest class mean, or, with ``class_mode: predicted`` and the
    predicted class passed to ``score``, the distance to that class's mean.
``knn``
    Euclidean distance to the k nearest reference points (exact brute force in numpy: one
    matrix product per block of queries): their mean (``reduce: mean``) or the k-th
    (``reduce: kth``).
``iforest``
    ``sklearn.ensemble.IsolationForest``; the score is ``-score_samples`` (in (0, 1], about 0.5
    for typical points). The fitted trees are stored as arrays and scored by a vectorised
    traversal that gives exactly sklearn's numbers (and needs no pickle).

Features come from one *source*, named by a string that the state records and that loading
checks: ``encoder:<name>:<variant>:sha256=<model file sha256>`` (the text encoder, see
:mod:`bastion.detectors.encoder`), ``input:<model>:<input>`` (the input tensor itself, e.g.
``input:fashion-mnist:image``), ``upstream:<model>:<output>`` (features the model returns, e.g.
``upstream:fashion-mnist:features``).

State files (``.npz``, no pickle): the fitted arrays plus ``__header__``, a JSON document with
the format name and version, the method and its parameters, the source, the feature dimension,
the sha256 of every array and a checksum over the header and the array digests. Loading refuses
(:class:`StateError`, naming the file and what is wrong) a file of another format or version,
from another source, for another method, with a changed array or header.

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

import abc
import argparse
import datetime
import io
import json
import os
import pathlib
import sys
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from bastion.core.registry import StageOptions, register
from bastion.detectors.base import Detector
from bastion.detectors.digests import array_digest, manifest_checksum
from bastion.transforms.base import NUMERIC_DATATYPES

__all__ = ["FORMAT", "VERSION", "METHODS", "StateError", "AnomalyModel", "Mahalanobis", "KNN",
           "IForest", "make_model", "save_state", "load_state", "pool_features",
           "FeatureAnomalyDetector", "InputAnomalyDetector", "InputAnomalyOptions"]

FORMAT = "bastion.anomaly-state"
VERSION = 1
METHODS = ("mahalanobis", "knn", "iforest")
Method = Literal["mahalanobis", "knn", "iforest"]
_HEADER_KEY = "__header__"


class StateError(ValueError):
    """A state file that must not be used (other source, version, method; bad checksum)."""


def _as_2d(X: Any) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {list(X.shape)}")
    if X.dtype.kind not in "fiub":
        raise ValueError(f"features must be numeric, got {X.dtype}")
    return X


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class AnomalyModel(abc.ABC):
    """Fit on reference features [n, d]; score [m, d] -> [m], higher = more anomalous."""

    method: ClassVar[str]
    #: Scoring one row costs more than a few microseconds (run it off the event loop).
    heavy: ClassVar[bool] = False

    def __init__(self) -> None:
        self.dim: int | None = None
        self.n_reference = 0

    @property
    def fitted(self) -> bool:
        return self.dim is not None

    def fit(self, X: Any, classes: Any = None) -> "AnomalyModel":
        X = _as_2d(X).astype(np.float64)
        if len(X) < 2:
            raise ValueError("need at least 2 reference rows to fit")
        if not np.isfinite(X).all():
            raise ValueError("reference features contain NaN or infinity")
        if classes is not None:
            classes = np.asarray(classes).reshape(-1)
            if len(classes) != len(X):
                raise ValueError(f"{len(classes)} classes for {len(X)} rows")
        self._fit(X, classes)
        self.dim = X.shape[1]
        self.n_reference = len(X)
        return self

    def score(self, X: Any, classes: Any = None) -> np.ndarray:
        if not self.fitted:
            raise RuntimeError(f"{self.method} model is not fitted")
        X = _as_2d(X)
        if X.shape[1] != self.dim:
            raise ValueError(f"features have dimension {X.shape[1]}, the model was fitted on "
                             f"{self.dim}")
        X = X.astype(np.float64)
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():  # NaN / inf features are as anomalous as it gets
            X = np.where(np.isfinite(X), X, 0.0)
        if classes is not None:
            classes = np.asarray(classes).reshape(-1)
            if len(classes) != len(X):
                raise ValueError(f"{len(classes)} classes for {len(X)} rows")
        out = np.asarray(self._score(X, classes), dtype=np.float64)
        out[bad] = np.inf
        return out

    @abc.abstractmethod
    def _fit(self, X: np.ndarray, classes: np.ndarray | None) -> None: ...

    @abc.abstractmethod
    def _score(self, X: np.ndarray, classes: np.ndarray | None) -> np.ndarray: ...

    # -- state ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def params(self) -> dict:
        """Constructor parameters (JSON)."""

    @abc.abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted state as plain numeric arrays."""

    @abc.abstractmethod
    def _restore(self, arrays: dict[str, np.ndarray]) -> None: ...

    @classmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray], dim: int,
                   n_reference: int) -> "AnomalyModel":
        model = cls(**params)
        model._restore(arrays)
        model.dim = dim
        model.n_reference = n_reference
        return model


class Mahalanobis(AnomalyModel):
    """Ledoit-Wolf Mahalanobis distance; class-conditional (shared covariance) with classes."""

    method = "mahalanobis"

    def __init__(self, class_mode: Literal["min", "predicted"] = "min"):
        super().__init__()
        if class_mode not in ("min", "predicted"):
            raise ValueError("class_mode must be 'min' or 'predicted'")
        self.class_mode = class_mode
        self.classes_: np.ndarray | None = None   # class labels (int64), None = one Gaussian
        self.whitener: np.ndarray | None = None   # W with W W^T = precision
        self.means_w: np.ndarray | None = None    # class means, whitened [C, d]
        self.shrinkage = 0.0

    @property
    def class_conditional(self) -> bool:
        return self.classes_ is not None

    def _fit(self, X: np.ndarray, classes: np.ndarray | None) -> None:
        from sklearn.covariance import LedoitWolf

        if classes is None:
            labels = np.zeros(1, dtype=np.int64)
            means = X.mean(axis=0, keepdims=True)
            centred = X - means
            self.classes_ = None
        else:
            labels, inverse = np.unique(classes.astype(np.int64), return_inverse=True)
            counts = np.bincount(inverse)
            means = np.zeros((len(labels), X.shape[1]))
            np.add.at(means, inverse, X)
            means /= counts[:, None]
            centred = X - means[inverse]
            self.classes_ = labels
        lw = LedoitWolf(assume_centered=True).fit(centred)
        self.shrinkage = float(lw.shrinkage_)
        # Whitening from the eigendecomposition of the (well conditioned, shrunk) covariance.
        eigval, eigvec = np.linalg.eigh(lw.covariance_)
        eigval = np.maximum(eigval, eigval.max() * 1e-12)
        self.whitener = eigvec / np.sqrt(eigval)
        self.means_w = means @ self.whitener

    def _score(self, X: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
        Z = X @ self.whitener
        if (classes is not None and self.class_conditional and self.class_mode == "predicted"):
            rows = np.searchsorted(self.classes_, classes.astype(np.int64))
            rows = np.clip(rows, 0, len(self.classes_) - 1)
            known = self.classes_[rows] == classes
            diff = Z - self.means_w[rows]
            d2 = np.einsum("ij,ij->i", diff, diff)
            if not known.all():  # a class never seen in fitting: nearest class instead
                d2[~known] = self._min_d2(Z[~known])
            return np.sqrt(np.maximum(d2, 0.0))
        return np.sqrt(self._min_d2(Z))

    def _min_d2(self, Z: np.ndarray) -> np.ndarray:
        d2 = (np.einsum("ij,ij->i", Z, Z)[:, None] - 2.0 * Z @ self.means_w.T
              + np.einsum("ij,ij->i", self.means_w, self.means_w)[None, :])
        return np.maximum(d2.min(axis=1), 0.0)

    def params(self) -> dict:
        return {"class_mode": self.class_mode}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"whitener": self.whitener, "means_w": self.means_w,
               "shrinkage": np.array(self.shrinkage)}
        if self.classes_ is not None:
            out["classes"] = self.classes_
        return out

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.whitener = arrays["whitener"].astype(np.float64)
        self.means_w = arrays["means_w"].astype(np.float64)
        self.shrinkage = float(arrays["shrinkage"])
        self.classes_ = arrays["classes"].astype(np.int64) if "classes" in arrays else None


class KNN(AnomalyModel):
    """Distance to the k nearest reference rows (mean of the k, or the k-th)."""

    method = "knn"

    def __init__(self, k: int = 10, reduce: Literal["mean", "kth"] = "mean",
                 max_reference: int = 50_000, seed: int = 0):
        super().__init__()
        if k < 1:
            raise ValueError("k must be >= 1")
        if reduce not in ("mean", "kth"):
            raise ValueError("reduce must be 'mean' or 'kth'")
        self.k = int(k)
        self.reduce = reduce
        self.max_reference = int(max_reference)
        self.seed = int(seed)
        self.reference: np.ndarray | None = None
        self._norms_cache = None   # squared norms of the reference rows, on first use
        self._lock = threading.Lock()
        self._chunk = 128    # query rows per distance block (bounds memory: 128 x n floats)

    def _fit(self, X: np.ndarray, classes: np.ndarray | None) -> None:
        if len(X) > self.max_reference:  # bounded state and query cost
            rng = np.random.default_rng(self.seed)
            X = X[np.sort(rng.choice(len(X), self.max_reference, replace=False))]
        if len(X) < self.k:
            raise ValueError(f"k={self.k} needs at least {self.k} reference rows, got {len(X)}")
        self.reference = np.ascontiguousarray(X, dtype=np.float32)
        self._norms_cache = None

    def _norms(self) -> np.ndarray:
        with self._lock:
            if self._norms_cache is None:
                ref = self.reference.astype(np.float64)
                self._norms_cache = np.einsum("ij,ij->i", ref, ref).astype(np.float32)
            return self._norms_cache

    def _score(self, X: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
        # Brute force in numpy rather than sklearn's NearestNeighbors: a sidecar scores one or a
        # few rows per request, where sklearn's per-call overhead dominates (~10 ms vs ~0.2 ms
        # for 20k x 48). Candidates come from a float32 matrix product; the final k distances
        # are recomputed exactly in float64 among 4k + 8 candidates.
        reference, norms = self.reference, self._norms()
        candidates = min(len(reference), 4 * self.k + 8)
        out = np.empty(len(X), dtype=np.float64)
        for start in range(0, len(X), self._chunk):
            queries = X[start:start + self._chunk]
            order = norms[None, :] - 2.0 * (queries.astype(np.float32) @ reference.T)
            if candidates < len(reference):
                nearest = np.argpartition(order, candidates - 1, axis=1)[:, :candidates]
            else:
                nearest = np.broadcast_to(np.arange(len(reference)), order.shape)
            exact = np.sqrt(np.einsum("qcd,qcd->qc", *(2 * [reference[nearest].astype(
                np.float64) - queries[:, None, :]])))
            exact.sort(axis=1)
            top = exact[:, :self.k]
            out[start:start + len(queries)] = top.mean(axis=1) if self.reduce == "mean" \
                else top[:, -1]
        return out

    def params(self) -> dict:
        return {"k": self.k, "reduce": self.reduce, "max_reference": self.max_reference,
                "seed": self.seed}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"reference": self.reference}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.reference = np.ascontiguousarray(arrays["reference"], dtype=np.float32)
        if len(self.reference) < self.k:
            raise StateError(f"knn state has {len(self.reference)} rows for k={self.k}")
        self._norms_cache = None


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): average path length of an unsuccessful BST search (as sklearn computes it)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class IForest(AnomalyModel):
    """Isolation forest; score = -sklearn's ``score_samples`` (higher = more anomalous)."""

    method = "iforest"
    heavy = True

    def __init__(self, n_estimators: int = 200, max_samples: int | str = "auto", seed: int = 0):
        super().__init__()
        self.n_estimators = int(n_estimators)
        self.max_samples = max_samples
        self.seed = int(seed)
        # [T, M] node arrays (M = most nodes of any tree; padded nodes are never reached)
        self.left: np.ndarray | None = None
        self.right: np.ndarray | None = None
        self.feature: np.ndarray | None = None
        self.threshold: np.ndarray | None = None
        self.value: np.ndarray | None = None     # at leaves: depth + c(n_node_samples)
        self.denominator = 1.0                   # T * c(max_samples_)
        self.max_depth = 0

    def _fit(self, X: np.ndarray, classes: np.ndarray | None) -> None:
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(n_estimators=self.n_estimators, max_samples=self.max_samples,
                                 random_state=self.seed, n_jobs=1).fit(X)
        self._from_sklearn(forest)
        self._sklearn = forest  # kept for tests (exactness); not saved

    def _from_sklearn(self, forest) -> None:
        trees = [est.tree_ for est in forest.estimators_]
        for features in forest.estimators_features_:
            if len(features) != forest.n_features_in_ or not np.all(
                    np.sort(features) == np.arange(forest.n_features_in_)):
                raise ValueError("feature subsampling (max_features < 1) is not supported")
        size = max(t.node_count for t in trees)
        count = len(trees)
        self.left = np.full((count, size), -1, dtype=np.int32)
        self.right = np.full((count, size), -1, dtype=np.int32)
        self.feature = np.zeros((count, size), dtype=np.int32)
        self.threshold = np.zeros((count, size), dtype=np.float64)
        self.value = np.zeros((count, size), dtype=np.float64)
        depth_max = 0
        for i, (tree, features) in enumerate(zip(trees, forest.estimators_features_)):
            n = tree.node_count
            left, right = tree.children_left, tree.children_right
            self.left[i, :n] = left
            self.right[i, :n] = right
            # estimator feature indices -> original feature indices
            self.feature[i, :n] = np.where(tree.feature >= 0,
                                           np.asarray(features)[np.maximum(tree.feature, 0)], 0)
            self.threshold[i, :n] = tree.threshold
            depth = np.zeros(n, dtype=np.int64)
            for node in range(n):  # parents come before children in sklearn's node order
                if left[node] >= 0:
                    depth[left[node]] = depth[node] + 1
                    depth[right[node]] = depth[node] + 1
            depth_max = max(depth_max, int(depth.max()))
            self.value[i, :n] = depth + _average_path_length(tree.n_node_samples)
        self.max_depth = depth_max
        self.denominator = float(count * _average_path_length(
            np.array([forest._max_samples]))[0])

    def _score(self, X: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
        # sklearn's trees compare float32 features with float64 thresholds
        X = X.astype(np.float32).astype(np.float64)
        count = self.left.shape[0]
        rows = np.arange(count)[None, :]
        node = np.zeros((len(X), count), dtype=np.int64)
        sample = np.arange(len(X))[:, None]
        for _ in range(self.max_depth):
            left = self.left[rows, node]
            internal = left >= 0
            if not internal.any():
                break
            go_left = X[sample, self.feature[rows, node]] <= self.threshold[rows, node]
            node = np.where(internal, np.where(go_left, left, self.right[rows, node]), node)
        depths = self.value[rows, node].sum(axis=1)
        if self.denominator == 0:
            return np.ones(len(X))
        return 2.0 ** (-depths / self.denominator)

    def params(self) -> dict:
        return {"n_estimators": self.n_estimators, "max_samples": self.max_samples,
                "seed": self.seed}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"left": self.left, "right": self.right, "feature": self.feature,
                "threshold": self.threshold, "value": self.value,
                "denominator": np.array(self.denominator), "max_depth": np.array(self.max_depth)}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.left = arrays["left"].astype(np.int32)
        self.right = arrays["right"].astype(np.int32)
        self.feature = arrays["feature"].astype(np.int32)
        self.threshold = arrays["threshold"].astype(np.float64)
        self.value = arrays["value"].astype(np.float64)
        self.denominator = float(arrays["denominator"])
        self.max_depth = int(arrays["max_depth"])
        shapes = {a.shape for a in (self.left, self.right, self.feature, self.threshold,
                                    self.value)}
        if len(shapes) != 1:
            raise StateError("iforest state arrays disagree in shape")


_MODELS: dict[str, type[AnomalyModel]] = {"mahalanobis": Mahalanobis, "knn": KNN,
                                          "iforest": IForest}


def make_model(method: str, *, k: int = 10, reduce: str = "mean", class_mode: str = "min",
               n_estimators: int = 200, seed: int = 0, max_reference: int = 50_000
               ) -> AnomalyModel:
    if method == "mahalanobis":
        return Mahalanobis(class_mode=class_mode)
    if method == "knn":
        return KNN(k=k, reduce=reduce, max_reference=max_reference, seed=seed)
    if method == "iforest":
        return IForest(n_estimators=n_estimators, seed=seed)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


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
        "dim": model.dim,
        "n_reference": model.n_reference,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
    }
    return write_state_file(path, header, arrays)


def write_state_file(path: str | os.PathLike, header: dict,
                     arrays: dict[str, np.ndarray]) -> pathlib.Path:
    """Write a checksummed state (``header`` + the digest of every array) atomically: a
    temporary file renamed over ``path``. The one writer of every detector state format."""
    path = pathlib.Path(path)
    header = {**header, "arrays": {name: array_digest(a) for name, a in sorted(arrays.items())}}
    header["checksum"] = manifest_checksum(header)
    payload = dict(arrays)
    payload[_HEADER_KEY] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **payload)
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


def read_state_file(path: str | os.PathLike, fmt: str, version: int,
                    what: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of a state written by :func:`write_state_file`, verified: format,
    version, header checksum, and every array against its digest. ``what`` names the kind of
    state in errors."""
    path = pathlib.Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise StateError(f"{path}: not a readable state file ({err})") from None
    with data:
        if _HEADER_KEY not in data.files:
            raise StateError(f"{path}: not a bastion {what} state (no header)")
        try:
            header = json.loads(data[_HEADER_KEY].tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StateError(f"{path}: unreadable header") from None
        if header.get("format") != fmt:
            raise StateError(f"{path}: format {header.get('format')!r}, expected {fmt!r}")
        if header.get("version") != version:
            raise StateError(f"{path}: state format version {header.get('version')!r}; this "
                             f"Bastion reads version {version}: refit it (bastion calibrate)")
        if header.get("checksum") != manifest_checksum(header):
            raise StateError(f"{path}: header checksum mismatch (the file was modified)")
        expected = header.get("arrays", {})
        present = {name for name in data.files if name != _HEADER_KEY}
        if present != set(expected):
            raise StateError(f"{path}: arrays {sorted(present)} do not match the header's "
                             f"{sorted(expected)}")
        arrays = {}
        for name in sorted(expected):
            array = data[name]
            if array_digest(array) != expected[name]:
                raise StateError(f"{path}: checksum mismatch in array {name!r} (the file was "
                                 "modified or is corrupt)")
            arrays[name] = array
    return header, arrays


def read_header(path: str | os.PathLike) -> dict:
    with np.load(path, allow_pickle=False) as data:
        if _HEADER_KEY not in data.files:
            raise StateError(f"{path}: not a bastion anomaly state (no header)")
        return json.loads(data[_HEADER_KEY].tobytes().decode())


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
    cls = _MODELS.get(header.get("method"))
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
        return self.model.score(_as_2d(features), predicted)

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
    print(f"{path}: {model.method} on {model.n_reference} x {model.dim} features from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
