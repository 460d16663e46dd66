"""`detect.features`: score the features the upstream model returns (a response stage).

Lee et al. (2018) detect adversarial and out-of-distribution inputs from a model's own hidden
features; a sidecar cannot reach into the model, but a model server can return a hidden layer as
an extra output (the demo CNN returns ``features``, its 64-d penultimate layer, and
``conv1_stats``, statistics of its first conv block). This stage:

1. before forwarding, asks for that output (and the ``logits`` output when the state's
   Mahalanobis model scores against the predicted class) if the client named the outputs it
   wants and did not name these: a request naming no outputs gets all of them anyway;
2. scores the output's rows with a fitted :class:`~bastion.detectors.anomaly_models.AnomalyModel`
   (Mahalanobis, class-conditional or not, kNN, IsolationForest), the request's score being its
   most anomalous row's;
3. removes what it added from the answer, so the client gets exactly the outputs it asked for.

Options
    ``output`` ("features"): the model output scored, [N, ...] (flattened per row).
    ``state``: the fitted state (``bastion calibrate`` writes it; or
    ``python -m bastion.detectors.anomaly fit``). ``method``: what the state must hold.
    ``source``: the feature source the state must record; default ``upstream:*:<output>``
    (any model's ``output``: name it, e.g. ``upstream:fashion-mnist:features``, to also tie the
    state to the model). ``logits`` ("logits"): the output whose argmax is the predicted class,
    used only by a Mahalanobis state fitted with ``class_mode: predicted``; null = never.

Several ``detect.features`` stages (one per output) can share a pipeline: response stages finish
in the reverse order of their ``prepare`` (as Envoy's encoder filters), so each removes its own
additions only after the stages after it have read them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import pathlib

from typing import Literal

import numpy as np

from pydantic import Field

from bastion.core.learner import FeatureReference, Learner
from bastion.core.registry import StageOptions, register
from bastion.detectors.anomaly import FeatureAnomalyDetector, load_state, save_state
from bastion.detectors.anomaly_models import Method, make_model
from bastion.detectors.base import ResponseResult, ResponseStage
from bastion.protos import codec
from bastion.transforms.base import NUMERIC_DATATYPES

__all__ = ["UpstreamFeatureOptions", "UpstreamFeatureStage", "AddedOutputs", "ask_for_outputs",
           "take_outputs", "strip_outputs"]


class UpstreamFeatureOptions(StageOptions):
    output: str = "features"
    #: State file written by ``bastion calibrate`` (required).
    state: str
    #: Method the state must hold (a mismatch is refused when the stage is built).
    method: Method = "mahalanobis"
    #: Source the state must record (glob); None = ``upstream:*:<output>``.
    source: str | None = None
    #: Output whose argmax is the predicted class (class_mode: predicted); None = never.
    logits: str | None = "logits"
    # Fitting only (``bastion calibrate``; a fitted state holds its own parameters):
    #: Mahalanobis: one Gaussian per class (Lee et al.), classes from the data's labels or,
    #: without labels, the upstream's predicted class.
    class_conditional: bool = True
    class_mode: Literal["min", "predicted"] = "min"
    k: int = Field(default=10, ge=1)
    reduce: Literal["mean", "kth"] = "mean"
    n_estimators: int = Field(default=200, ge=1)
    seed: int = 0


def strip_outputs(response, names: set[str]) -> None:
    """Remove the outputs ``names`` from a ModelInferResponse, keeping the others' bytes as
    they are (raw contents stay aligned with their tensors)."""
    if not names:
        return
    raw = list(response.raw_output_contents)
    kept = [(i, t) for i, t in enumerate(response.outputs) if t.name not in names]
    if len(kept) == len(response.outputs):
        return
    kept_outputs = [type(t)() for _, t in kept]
    for copy, (_, original) in zip(kept_outputs, kept):
        copy.CopyFrom(original)
    del response.outputs[:]
    response.outputs.extend(kept_outputs)
    if raw:
        del response.raw_output_contents[:]
        response.raw_output_contents.extend(raw[i] for i, _ in kept)


@dataclasses.dataclass
class AddedOutputs:
    added: set[str]        # outputs asked for on the client's behalf: removed from the answer


def ask_for_outputs(request, wanted: list[str]) -> AddedOutputs:
    """Add the ``wanted`` outputs a client that named its outputs left out (a client that named
    none gets every output anyway); what was added is removed from the answer again."""
    named = {o.name for o in request.outputs}
    added = set()
    if named:
        for name in wanted:
            if name not in named:
                request.outputs.add(name=name)
                added.add(name)
    return AddedOutputs(added)


def take_outputs(response, wanted: set[str], state: AddedOutputs) -> dict[str, np.ndarray]:
    """The ``wanted`` outputs of the answer, decoded; then the ones added on the client's behalf
    are stripped (first, so whatever happens next the client gets only what it asked for)."""
    arrays = {}
    for position, spec in enumerate(response.outputs):
        if spec.name in wanted:
            arrays[spec.name] = codec.decode_response(_one_output(response, position))[spec.name]
    strip_outputs(response, state.added)
    return arrays


class UpstreamFeatureStage(ResponseStage, Learner):
    """``bastion calibrate`` fits it (a Learner) on the upstream's answers to benign inputs."""

    accepts = NUMERIC_DATATYPES

    def __init__(self, options: UpstreamFeatureOptions):
        self.options = options
        self.state = pathlib.Path(options.state)
        self.source_pattern = options.source or f"upstream:*:{options.output}"
        if self.state.exists():
            model, header = load_state(self.state, method=options.method)
            recorded = str(header.get("source"))
            if not fnmatch.fnmatchcase(recorded, self.source_pattern):
                raise ValueError(f"{options.state}: fitted on features from {recorded!r}, but "
                                 f"this stage scores {self.source_pattern!r}: refit the state "
                                 "(bastion calibrate) or point the stage at the right one")
        else:  # not fitted yet: scoring fails (on_error decides) until `bastion calibrate` ran
            model, recorded = self._new_model(), self.source_pattern
        self._use(model, recorded)

    def _new_model(self):
        o = self.options
        return make_model(o.method, k=o.k, reduce=o.reduce, class_mode=o.class_mode,
                          n_estimators=o.n_estimators, seed=o.seed)

    def _use(self, model, source: str) -> None:
        self.detector_ = FeatureAnomalyDetector(model, source)
        uses_class = getattr(model, "class_conditional", False) and \
            getattr(model, "class_mode", "min") == "predicted"
        self.logits = self.options.logits if uses_class else None

    def wanted(self, fitting: bool = False) -> list[str]:
        """Outputs this stage reads (when fitting, also the predicted class's)."""
        needs_class = fitting and self.options.class_conditional and \
            self.options.method == "mahalanobis"
        logits = self.logits or (self.options.logits if needs_class else None)
        return [self.options.output] + ([logits] if logits else [])

    # --- fitting (bastion calibrate) -----------------------------------------------------
    def fit(self, reference: FeatureReference) -> "UpstreamFeatureStage":
        """Fit a fresh model on benign rows (classes: per row, for a class-conditional
        Mahalanobis) and use it; ``source`` is recorded in the state."""
        features, classes, source = reference.features, reference.classes, reference.source
        if not fnmatch.fnmatchcase(source, self.source_pattern):
            raise ValueError(f"features from {source!r} do not match the stage's source "
                             f"{self.source_pattern!r}")
        use_classes = self.options.method == "mahalanobis" and self.options.class_conditional
        model = self._new_model().fit(features.reshape(len(features), -1),
                                      classes if use_classes else None)
        self._use(model, source)
        return self

    def save(self) -> pathlib.Path:
        return save_state(self.state, self.detector_.model, self.detector_.source)

    def score_rows(self, features: np.ndarray, predicted: np.ndarray | None = None) -> np.ndarray:
        """Per-row scores, as ``on_response`` computes them."""
        return self.detector_.score_features(
            features.reshape(len(features), -1).astype(np.float64),
            predicted if self.logits else None)

    def prepare(self, request, inputs, request_id) -> AddedOutputs:
        return ask_for_outputs(request, self.wanted())

    async def on_response(self, state: AddedOutputs, response, call_upstream) -> ResponseResult:
        arrays = take_outputs(response, set(self.wanted()), state)
        if not self.detector_.model.fitted:
            raise RuntimeError(f"detect.features: no fitted state at {self.state} (run "
                               "`bastion calibrate` for this stage)")
        features = arrays.get(self.options.output)
        if features is None:
            raise ValueError(f"the upstream's answer has no output '{self.options.output}'")
        if features.dtype.kind not in "fiub":
            raise ValueError(f"output '{self.options.output}' is not numeric")
        rows = features.reshape(len(features), -1) if features.ndim > 1 else features[None]
        if rows.shape[1] != self.detector_.model.dim_:
            raise ValueError(f"output '{self.options.output}' has {rows.shape[1]} values per "
                             f"row; the state was fitted on {self.detector_.model.dim_}")
        predicted = None
        if self.logits and self.logits in arrays:
            logits = arrays[self.logits]
            predicted = logits.reshape(len(rows), -1).argmax(axis=1)
        rows = rows.astype(np.float64)
        if self.detector_.model.method == "mahalanobis":  # a few matrix products: inline
            scores = self.detector_.score_features(rows, predicted)
        else:  # neighbour search / tree walks: off the event loop
            scores = await asyncio.to_thread(self.detector_.score_features, rows, predicted)
        score = float(np.max(scores)) if len(scores) else 0.0
        if not np.isfinite(score):  # a non-finite feature is as anomalous as it gets
            score = float(np.finfo(np.float64).max)
        return ResponseResult(score, [f"anomaly:{self.options.output}:{self.detector_.model.method}"])


def _one_output(response, position: int):
    """A response holding only output ``position`` (decoding one output, not all of them)."""
    single = type(response)()
    single.outputs.add().CopyFrom(response.outputs[position])
    if response.raw_output_contents:
        single.raw_output_contents.append(response.raw_output_contents[position])
    return single


register("detect.features", "response", UpstreamFeatureOptions, UpstreamFeatureStage)
