"""Model-extraction detection after PRADA (Juuti et al., "PRADA: Protecting against DNN Model
Stealing Attacks", EuroS&P 2019).

Per (client, model) a bounded set of that client's earlier queries is kept (feature vectors: the
flattened input, randomly projected to ``feature_dim`` when longer). Each new query's minimum L2
distance to the earlier ones of the same predicted class (one group without classes) is appended
to the client's distance list. Natural queries give minimum distances that are close to normally
distributed; synthetic queries made from a few seeds by small perturbations and interpolations (as
extraction attacks do, to probe decision boundaries) give a distribution with a spike of small
distances and a long tail. Once ``min_queries`` distances exist, the Shapiro-Wilk test runs on the
most recent ``window`` of them (low outliers beyond ``outlier_sigma`` standard deviations
dropped, as PRADA does); W below ``w_threshold`` flags the client.

Exact repeats of a stored query (distance 0) are counted but not measured: they teach an attacker
nothing, and a benign client that resends an input would otherwise pile up zeros.

PRADA's growing set is available (``grow_threshold: true``): a query then joins the stored set
only when its distance exceeds the class threshold T_c = max(T_c, mean - std of the set's
distances). On the data measured here (scikit-learn digits, see tests/test_extraction.py) storing
every query separated attack from benign traffic better, so that is the default.

Calibration (tests/test_extraction.py; benign = natural images drawn at random, repeats
included; attacks = JbDA-style sign perturbations of earlier queries and interpolations, grown
from 10 seeds): on scikit-learn's digits (1797 images, 8x8 and upsampled to 28x28 through the
projection) benign W never fell below 0.899 once 75 distances existed (~150 runs of 1000
queries); attacks reached W < 0.88 after 79-275 queries in 17 of 18 runs (one "mixed" run on the
upsampled digits stayed at W >= 0.90: the two distributions overlap there). On the bundled
Fashion-MNIST sample (64 images, the demo model's classes) all 9 attack runs were flagged after
81-110 queries; its 64 images are too few to measure benign W. Hence ``min_queries: 75`` and
``w_threshold: 0.88``; recalibrate on a model's own traffic (with only 50 distances benign runs
reached W 0.874-0.879).

Memory is bounded: at most ``max_clients`` (client, model) pairs (least recently used dropped),
each with at most ``max_queries_per_client`` float32 vectors of ``feature_dim`` (the oldest
replaced) and ``window`` distances; see ``ExtractionMonitor.memory_bound_bytes`` (about 135 MiB
worst case with the defaults). ``observe`` is synchronous numpy/scipy work of ~0.1 ms; call it
off the event loop (``asyncio.to_thread``) or after the response is sent.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import warnings

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats


# Closer than this (in feature units) to a stored query of the same class is the same input again.
REPEAT_DISTANCE = 1e-6


class ExtractionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Distances needed before the first test, and the most recent ones tested (Shapiro-Wilk's
    # p-value approximation holds up to 5000).
    min_queries: int = Field(75, ge=20)
    window: int = Field(500, ge=20, le=5000)
    # PRADA reports thresholds of about 0.87-0.96 depending on the model and attack.
    w_threshold: float = Field(0.88, gt=0, lt=1)
    max_queries_per_client: int = Field(2000, ge=10)
    max_clients: int = Field(256, ge=1)
    # Longer inputs are projected (seeded Gaussian, distance-preserving in expectation).
    feature_dim: int = Field(64, ge=4)
    grow_threshold: bool = False
    outlier_sigma: float | None = Field(3.0, gt=0)
    # Run the test every N queries once min_queries is reached (1: every query).
    check_every: int = Field(1, ge=1)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ExtractionResult:
    w: float | None          # Shapiro-Wilk W of the recent distances; None before min_queries
    flagged: bool
    queries: int             # queries seen from this client for this model


class _Pair:
    """One (client, model): stored vectors, their classes, per-class thresholds, distances."""

    __slots__ = ("vectors", "classes", "count", "oldest", "threshold", "grown", "distances",
                 "queries", "repeats", "w", "dim")

    def __init__(self, dim: int, window: int):
        self.vectors = np.empty((16, dim), np.float32)
        self.classes = np.empty(16, np.int64)
        self.count = 0                     # rows in use
        self.oldest = 0                    # next row to replace once full
        self.threshold: dict[int, float] = {}
        # Per class: count, sum, sum of squares of the distances of stored queries.
        self.grown: dict[int, list[float]] = {}
        self.distances: collections.deque[float] = collections.deque(maxlen=window)
        self.queries = 0
        self.repeats = 0
        self.w: float | None = None
        self.dim = dim

    def add(self, vector: np.ndarray, label: int, cap: int) -> None:
        if self.count < cap:
            if self.count == len(self.vectors):
                size = min(cap, 2 * len(self.vectors))
                self.vectors = np.concatenate(
                    [self.vectors, np.empty((size - self.count, self.dim), np.float32)])
                self.classes = np.concatenate(
                    [self.classes, np.empty(size - self.count, np.int64)])
            row = self.count
            self.count += 1
        else:
            row = self.oldest
            self.oldest = (self.oldest + 1) % cap
        self.vectors[row] = vector
        self.classes[row] = label

    def nearest(self, vector: np.ndarray, label: int) -> float | None:
        """Minimum L2 distance to the stored vectors of this class; None if there are none."""
        if self.count == 0:
            return None
        stored = self.vectors[:self.count]
        mask = self.classes[:self.count] == label
        if not mask.all():
            if not mask.any():
                return None
            stored = stored[mask]
        diff = stored - vector
        return float(math.sqrt(max(0.0, float(np.einsum("ij,ij->i", diff, diff).min()))))

    def nbytes(self) -> int:
        return self.vectors.nbytes + self.classes.nbytes + 64 * len(self.distances)


class ExtractionMonitor:
    def __init__(self, config: ExtractionConfig | None = None):
        self.config = config or ExtractionConfig()
        self.pairs: collections.OrderedDict[tuple[str, str], _Pair] = collections.OrderedDict()
        self._projections: dict[int, np.ndarray] = {}

    # ---- features ----------------------------------------------------------------------------
    def features(self, vector) -> np.ndarray:
        """Flatten to float32 and project to feature_dim when longer."""
        flat = np.asarray(vector, dtype=np.float32).reshape(-1)
        if not np.isfinite(flat).all():
            flat = np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
        dim = self.config.feature_dim
        if flat.size <= dim:
            if flat.size == dim:
                return flat
            return np.pad(flat, (0, dim - flat.size))
        projection = self._projections.get(flat.size)
        if projection is None:
            rng = np.random.default_rng((self.config.seed, flat.size))
            projection = (rng.standard_normal((flat.size, dim)) / math.sqrt(dim)).astype(np.float32)
            if len(self._projections) >= 8:
                self._projections.pop(next(iter(self._projections)))
            self._projections[flat.size] = projection
        return flat @ projection

    # ---- state -------------------------------------------------------------------------------
    def _pair(self, identity: str, model: str) -> _Pair:
        key = (identity, model)
        pair = self.pairs.get(key)
        if pair is None:
            pair = self.pairs[key] = _Pair(self.config.feature_dim, self.config.window)
            if len(self.pairs) > self.config.max_clients:
                self.pairs.popitem(last=False)
        else:
            self.pairs.move_to_end(key)
        return pair

    def memory_bound_bytes(self) -> int:
        """Worst case for the stored vectors, classes and distances of all tracked pairs."""
        c = self.config
        per_pair = c.max_queries_per_client * (4 * c.feature_dim + 8) + 64 * c.window + 1024
        return c.max_clients * per_pair

    def memory_bytes(self) -> int:
        return sum(pair.nbytes() for pair in self.pairs.values())

    # ---- the detector ------------------------------------------------------------------------
    def observe(self, identity: str, model: str, vector, predicted_class: int | None = None
                ) -> ExtractionResult:
        """Record one query (its input tensor, and the model's predicted class if known)."""
        config = self.config
        features = self.features(vector)
        label = int(predicted_class) if predicted_class is not None else -1
        pair = self._pair(identity, model)
        pair.queries += 1
        distance = pair.nearest(features, label)
        if distance is None:
            pair.add(features, label, config.max_queries_per_client)
            pair.threshold[label] = 0.0
        elif distance <= REPEAT_DISTANCE:
            pair.repeats += 1        # an exact repeat: nothing new to learn from it, not measured
        else:
            pair.distances.append(distance)
            threshold = pair.threshold.get(label, 0.0)
            if not config.grow_threshold or distance > threshold:
                pair.add(features, label, config.max_queries_per_client)
                grown = pair.grown.setdefault(label, [0.0, 0.0, 0.0])
                grown[0] += 1
                grown[1] += distance
                grown[2] += distance * distance
                mean = grown[1] / grown[0]
                std = math.sqrt(max(0.0, grown[2] / grown[0] - mean * mean))
                pair.threshold[label] = max(threshold, mean - std)
            if len(pair.distances) >= config.min_queries and (
                    pair.queries % config.check_every == 0 or pair.w is None):
                pair.w = self._shapiro(pair.distances)
        flagged = pair.w is not None and pair.w < config.w_threshold
        return ExtractionResult(pair.w, flagged, pair.queries)

    def _shapiro(self, distances) -> float | None:
        sample = np.fromiter(distances, np.float64, len(distances))
        if self.config.outlier_sigma is not None:
            mean, std = sample.mean(), sample.std()
            sample = sample[sample > mean - self.config.outlier_sigma * std]
        # Identical distances (a client repeating one input) carry no shape to test: no
        # information is extracted by exact repeats, so no verdict either.
        if sample.size < 3 or np.ptp(sample) <= 1e-12 * max(1.0, float(np.abs(sample).max())):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = stats.shapiro(sample).statistic
        return float(w)

    def forget(self, identity: str, model: str | None = None) -> None:
        for key in [k for k in self.pairs if k[0] == identity and (model is None or k[1] == model)]:
            del self.pairs[key]
