"""Feature-space anomaly models: fit on benign reference features, score new ones.

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

A fitted model is plain numeric arrays plus JSON parameters (``arrays()``, ``params()``,
``from_state``); the anomaly state files that hold them
(:func:`bastion.detectors.anomaly.save_state`, :func:`~bastion.detectors.anomaly.load_state`) are
written in the checksummed format of :mod:`bastion.detectors.anomaly_state`.
"""
from __future__ import annotations

import abc
import threading
from typing import Any, ClassVar, Literal

import numpy as np

from bastion.detectors.anomaly_state import StateError

__all__ = ["METHODS", "Method", "MODEL_CLASSES", "AnomalyModel", "Mahalanobis", "KNN", "IForest",
           "as_2d", "make_model"]

METHODS = ("mahalanobis", "knn", "iforest")
Method = Literal["mahalanobis", "knn", "iforest"]


def as_2d(X: Any) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {list(X.shape)}")
    if X.dtype.kind not in "fiub":
        raise ValueError(f"features must be numeric, got {X.dtype}")
    return X



class AnomalyModel(abc.ABC):
    """Fit on reference features [n, d]; score [m, d] -> [m], higher = more anomalous."""

    method: ClassVar[str]
    #: Scoring one row costs more than a few microseconds (run it off the event loop).
    heavy: ClassVar[bool] = False

    def __init__(self) -> None:
        self.dim_: int | None = None
        self.n_reference_ = 0

    @property
    def fitted(self) -> bool:
        return self.dim_ is not None

    def fit(self, X: Any, classes: Any = None) -> "AnomalyModel":
        X = as_2d(X).astype(np.float64)
        if len(X) < 2:
            raise ValueError("need at least 2 reference rows to fit")
        if not np.isfinite(X).all():
            raise ValueError("reference features contain NaN or infinity")
        if classes is not None:
            classes = np.asarray(classes).reshape(-1)
            if len(classes) != len(X):
                raise ValueError(f"{len(classes)} classes for {len(X)} rows")
        self._fit(X, classes)
        self.dim_ = X.shape[1]
        self.n_reference_ = len(X)
        return self

    def score(self, X: Any, classes: Any = None) -> np.ndarray:
        if not self.fitted:
            raise RuntimeError(f"{self.method} model is not fitted")
        X = as_2d(X)
        if X.shape[1] != self.dim_:
            raise ValueError(f"features have dimension {X.shape[1]}, the model was fitted on "
                             f"{self.dim_}")
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
        model.dim_ = dim
        model.n_reference_ = n_reference
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
        self.whitener_: np.ndarray | None = None   # W with W W^T = precision
        self.means_w_: np.ndarray | None = None    # class means, whitened [C, d]
        self.shrinkage_ = 0.0

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
        self.shrinkage_ = float(lw.shrinkage_)
        # Whitening from the eigendecomposition of the (well conditioned, shrunk) covariance.
        eigval, eigvec = np.linalg.eigh(lw.covariance_)
        eigval = np.maximum(eigval, eigval.max() * 1e-12)
        self.whitener_ = eigvec / np.sqrt(eigval)
        self.means_w_ = means @ self.whitener_
        self._means_sq = np.einsum("ij,ij->i", self.means_w_, self.means_w_)

    def _score(self, X: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
        Z = X @ self.whitener_
        if (classes is not None and self.class_conditional and self.class_mode == "predicted"):
            rows = np.searchsorted(self.classes_, classes.astype(np.int64))
            rows = np.clip(rows, 0, len(self.classes_) - 1)
            known = self.classes_[rows] == classes
            diff = Z - self.means_w_[rows]
            d2 = np.einsum("ij,ij->i", diff, diff)
            if not known.all():  # a class never seen in fitting: nearest class instead
                d2[~known] = self._min_d2(Z[~known])
            return np.sqrt(np.maximum(d2, 0.0))
        return np.sqrt(self._min_d2(Z))

    def _min_d2(self, Z: np.ndarray) -> np.ndarray:
        # |z - m|^2 = |z|^2 - 2 z.m + |m|^2; the means' norms are computed once (hot path:
        # one or a few rows per request)
        d2 = np.einsum("ij,ij->i", Z, Z)[:, None] - 2.0 * Z @ self.means_w_.T + self._means_sq
        return np.maximum(d2.min(axis=1), 0.0)

    def params(self) -> dict:
        return {"class_mode": self.class_mode}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"whitener": self.whitener_, "means_w": self.means_w_,
               "shrinkage": np.array(self.shrinkage_)}
        if self.classes_ is not None:
            out["classes"] = self.classes_
        return out

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.whitener_ = arrays["whitener"].astype(np.float64)
        self.means_w_ = arrays["means_w"].astype(np.float64)
        self._means_sq = np.einsum("ij,ij->i", self.means_w_, self.means_w_)
        self.shrinkage_ = float(arrays["shrinkage"])
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
        self.reference_: np.ndarray | None = None
        self._norms_cache = None   # squared norms of the reference rows, on first use
        self._lock = threading.Lock()
        self._chunk = 128    # query rows per distance block (bounds memory: 128 x n floats)

    def _fit(self, X: np.ndarray, classes: np.ndarray | None) -> None:
        if len(X) > self.max_reference:  # bounded state and query cost
            rng = np.random.default_rng(self.seed)
            X = X[np.sort(rng.choice(len(X), self.max_reference, replace=False))]
        if len(X) < self.k:
            raise ValueError(f"k={self.k} needs at least {self.k} reference rows, got {len(X)}")
        self.reference_ = np.ascontiguousarray(X, dtype=np.float32)
        self._norms_cache = None

    def _norms(self) -> np.ndarray:
        with self._lock:
            if self._norms_cache is None:
                ref = self.reference_.astype(np.float64)
                self._norms_cache = np.einsum("ij,ij->i", ref, ref).astype(np.float32)
            return self._norms_cache

    def _score(self, X: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
        # Brute force in numpy rather than sklearn's NearestNeighbors: a sidecar scores one or a
        # few rows per request, where sklearn's per-call overhead dominates (~10 ms vs ~0.2 ms
        # for 20k x 48). Candidates come from a float32 matrix product; the final k distances
        # are recomputed exactly in float64 among 4k + 8 candidates.
        reference, norms = self.reference_, self._norms()
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
        return {"reference": self.reference_}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.reference_ = np.ascontiguousarray(arrays["reference"], dtype=np.float32)
        if len(self.reference_) < self.k:
            raise StateError(f"knn state has {len(self.reference_)} rows for k={self.k}")
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
        self.left_: np.ndarray | None = None
        self.right_: np.ndarray | None = None
        self.feature_: np.ndarray | None = None
        self.threshold_: np.ndarray | None = None
        self.value_: np.ndarray | None = None     # at leaves: depth + c(n_node_samples)
        self.denominator_ = 1.0                   # T * c(max_samples_)
        self.max_depth_ = 0

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
        self.left_ = np.full((count, size), -1, dtype=np.int32)
        self.right_ = np.full((count, size), -1, dtype=np.int32)
        self.feature_ = np.zeros((count, size), dtype=np.int32)
        self.threshold_ = np.zeros((count, size), dtype=np.float64)
        self.value_ = np.zeros((count, size), dtype=np.float64)
        depth_max = 0
        for i, (tree, features) in enumerate(zip(trees, forest.estimators_features_)):
            n = tree.node_count
            left, right = tree.children_left, tree.children_right
            self.left_[i, :n] = left
            self.right_[i, :n] = right
            # estimator feature indices -> original feature indices
            self.feature_[i, :n] = np.where(tree.feature >= 0,
                                           np.asarray(features)[np.maximum(tree.feature, 0)], 0)
            self.threshold_[i, :n] = tree.threshold
            depth = np.zeros(n, dtype=np.int64)
            for node in range(n):  # parents come before children in sklearn's node order
                if left[node] >= 0:
                    depth[left[node]] = depth[node] + 1
                    depth[right[node]] = depth[node] + 1
            depth_max = max(depth_max, int(depth.max()))
            self.value_[i, :n] = depth + _average_path_length(tree.n_node_samples)
        self.max_depth_ = depth_max
        self.denominator_ = float(count * _average_path_length(
            np.array([forest._max_samples]))[0])

    def _score(self, X: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
        # sklearn's trees compare float32 features with float64 thresholds
        X = X.astype(np.float32).astype(np.float64)
        count = self.left_.shape[0]
        rows = np.arange(count)[None, :]
        node = np.zeros((len(X), count), dtype=np.int64)
        sample = np.arange(len(X))[:, None]
        for _ in range(self.max_depth_):
            left = self.left_[rows, node]
            internal = left >= 0
            if not internal.any():
                break
            go_left = X[sample, self.feature_[rows, node]] <= self.threshold_[rows, node]
            node = np.where(internal, np.where(go_left, left, self.right_[rows, node]), node)
        depths = self.value_[rows, node].sum(axis=1)
        if self.denominator_ == 0:
            return np.ones(len(X))
        return 2.0 ** (-depths / self.denominator_)

    def params(self) -> dict:
        return {"n_estimators": self.n_estimators, "max_samples": self.max_samples,
                "seed": self.seed}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"left": self.left_, "right": self.right_, "feature": self.feature_,
                "threshold": self.threshold_, "value": self.value_,
                "denominator": np.array(self.denominator_), "max_depth": np.array(self.max_depth_)}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.left_ = arrays["left"].astype(np.int32)
        self.right_ = arrays["right"].astype(np.int32)
        self.feature_ = arrays["feature"].astype(np.int32)
        self.threshold_ = arrays["threshold"].astype(np.float64)
        self.value_ = arrays["value"].astype(np.float64)
        self.denominator_ = float(arrays["denominator"])
        self.max_depth_ = int(arrays["max_depth"])
        shapes = {a.shape for a in (self.left_, self.right_, self.feature_, self.threshold_,
                                    self.value_)}
        if len(shapes) != 1:
            raise StateError("iforest state arrays disagree in shape")


MODEL_CLASSES: dict[str, type[AnomalyModel]] = {"mahalanobis": Mahalanobis, "knn": KNN,
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
