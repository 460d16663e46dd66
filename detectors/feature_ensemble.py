"""`detect.feature_ensemble`: several of the model's layers, one score (a response stage).

Lee et al. (2018) detect adversarial inputs from a *feature ensemble*: a class-conditional
Mahalanobis distance on each of several hidden layers, combined by a logistic regression
fitted on benign inputs and one generic attack (FGSM), then used against attacks it never saw.
A sidecar cannot reach into the model, but the model server can return hidden layers as extra
outputs (the demo CNN returns ``conv1_stats``, ``conv2_stats``, ``features`` and ``logits``).

Per row the ensemble computes the feature vector

* ``maha:<output>``: log(1 + class-conditional Mahalanobis distance to the nearest class
  mean) of each configured output (the same :class:`~bastion.detectors.anomaly_models.Mahalanobis`
  ``detect.features`` uses);
* ``margin`` (when a logits output is configured): log(top-1 logit - top-2 logit + 0.01).
  Minimal-perturbation attacks (Carlini-Wagner, DeepFool) stop just past the decision
  boundary; clean inputs rarely sit there (docs/quality-image-defense.md measures it);
* ``maha_gaps:<output>`` (when ``gaps`` names a logits output): log(1 + Mahalanobis distance)
  of the row's log gaps to its top logit, log(top - logit_j + 0.01) for every class j, to the
  benign Gaussian of its *predicted* class. The margin only sees how close the runner-up is;
  the gaps also see *which* class it is: a boundary attack that turns a trouser into a
  T-shirt leaves the trouser logit next to the top one, where benign T-shirts never have it
  (their near classes are shirt and pullover);

standardises it and returns the combiner's log-odds (higher = more likely adversarial). The
request's score is its most suspicious row's.

Options
    ``outputs``: model outputs with a Mahalanobis term each, in the state's order.
    ``logits`` ("logits"): the output for the margin term; null = no margin term.
    ``gaps`` (null): the logits output for the ``maha_gaps`` term; null = none.
    ``state``: the fitted state (``fit_ensemble`` below; tools/fit_image_ensemble.py fits the
    shipped one through the profile's own request stages and the real upstream).

Like ``detect.features``, the stage asks for the outputs it needs when the client named the
outputs it wants, and removes what it added from the answer.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib

import numpy as np

from bastion.core.registry import StageOptions, register
from bastion.detectors.anomaly_models import Mahalanobis
from bastion.detectors.anomaly_state import read_state_file, write_state_file
from bastion.detectors.base import ResponseResult, ResponseStage
from bastion.detectors.upstream_features import AddedOutputs, ask_for_outputs, take_outputs
from bastion.transforms.base import NUMERIC_DATATYPES

__all__ = ["EnsembleModel", "FeatureEnsembleOptions", "FeatureEnsembleStage", "fit_ensemble",
           "load_ensemble", "save_ensemble"]

FORMAT = "bastion-feature-ensemble"
VERSION = 1
MARGIN_FLOOR = 0.01  # keeps log(margin) finite for ties


@dataclasses.dataclass
class EnsembleModel:
    """Per-layer Gaussians + a standardised logistic combiner."""
    outputs: list[str]
    logits: str | None
    gaussians: list[Mahalanobis]
    mean: np.ndarray            # feature standardisation
    scale: np.ndarray
    weights: np.ndarray         # combiner coefficients over standardised features
    bias: float
    source: str = ""            # what the state was fitted on (recorded, checked by the stage)
    gaps: str | None = None     # logits output of the maha_gaps term (its Gaussian comes last)

    @property
    def feature_names(self) -> list[str]:
        return ([f"maha:{o}" for o in self.outputs] + (["margin"] if self.logits else [])
                + ([f"maha_gaps:{self.gaps}"] if self.gaps else []))

    @property
    def needed(self) -> list[str]:
        return output_names(self.outputs, self.logits, self.gaps)

    def features(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return ensemble_features(arrays, self.outputs, self.gaussians, self.logits, self.gaps)

    def score(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Log-odds per row of ``arrays`` (output name -> [n, ...])."""
        z = (self.features(arrays) - self.mean) / self.scale
        return z @ self.weights + self.bias


def output_names(outputs: list[str], logits: str | None, gaps: str | None) -> list[str]:
    """The model outputs the terms read, each once (margin and gaps usually share the logits)."""
    names = list(outputs)
    for name in (logits, gaps):
        if name and name not in names:
            names.append(name)
    return names


def logit_gaps(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log(top - logit_j + MARGIN_FLOOR) per class [n, C], predicted class [n])."""
    values = np.asarray(logits, dtype=np.float64)
    values = values.reshape(len(values), -1)
    return (np.log(values.max(axis=1, keepdims=True) - values + MARGIN_FLOOR),
            values.argmax(axis=1))


def ensemble_features(arrays: dict[str, np.ndarray], outputs: list[str],
                      gaussians: list[Mahalanobis], logits: str | None,
                      gaps: str | None = None) -> np.ndarray:
    """[n, features] ensemble features of the model's answers (see module doc); the gaps
    term's Gaussian is the last of ``gaussians``."""
    columns = []
    for name, gaussian in zip(outputs, gaussians):
        rows = np.asarray(arrays[name], dtype=np.float64)
        rows = rows.reshape(len(rows), -1)
        if rows.shape[1] != gaussian.dim_:
            raise ValueError(f"output '{name}' has {rows.shape[1]} values per row; the state "
                             f"was fitted on {gaussian.dim_}")
        columns.append(np.log1p(gaussian.score(rows)))
    if logits:
        values = np.asarray(arrays[logits], dtype=np.float64)
        values = np.sort(values.reshape(len(values), -1), axis=1)
        columns.append(np.log(values[:, -1] - values[:, -2] + MARGIN_FLOOR))
    if gaps:
        rows, predicted = logit_gaps(arrays[gaps])
        gaussian = gaussians[len(outputs)]
        if rows.shape[1] != gaussian.dim_:
            raise ValueError(f"output '{gaps}' has {rows.shape[1]} values per row; the state "
                             f"was fitted on {gaussian.dim_}")
        columns.append(np.log1p(gaussian.score(rows, predicted)))
    features = np.stack(columns, axis=1)
    # a non-finite hidden value is as anomalous as it gets
    return np.where(np.isfinite(features), features, 1e6)


def fit_ensemble(benign_fit: dict[str, np.ndarray], classes: np.ndarray,
                 benign_combiner: dict[str, np.ndarray], attacked_combiner: dict[str, np.ndarray],
                 outputs: list[str], logits: str | None, source: str,
                 regularisation: float = 1.0, gaps: str | None = None) -> EnsembleModel:
    """Gaussians on ``benign_fit`` (class labels ``classes``; the gaps term's by the
    predicted class, the one it is scored against); then the logistic combiner on
    ``benign_combiner`` (label 0) vs ``attacked_combiner`` (label 1), each a dict of model
    outputs. Use disjoint benign sets so the combiner sees distances of unseen inputs."""
    from sklearn.linear_model import LogisticRegression
    gaussians = []
    for name in outputs:
        rows = np.asarray(benign_fit[name], dtype=np.float64)
        gaussians.append(Mahalanobis().fit(rows.reshape(len(rows), -1), classes))
    if gaps:
        rows, predicted = logit_gaps(benign_fit[gaps])
        gaussians.append(Mahalanobis(class_mode="predicted").fit(rows, predicted))
    benign = ensemble_features(benign_combiner, outputs, gaussians, logits, gaps)
    attacked = ensemble_features(attacked_combiner, outputs, gaussians, logits, gaps)
    X = np.concatenate([benign, attacked])
    y = np.concatenate([np.zeros(len(benign)), np.ones(len(attacked))])
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    combiner = LogisticRegression(C=regularisation, max_iter=2000).fit((X - mean) / scale, y)
    return EnsembleModel(list(outputs), logits, gaussians, mean, scale,
                         combiner.coef_[0].astype(np.float64), float(combiner.intercept_[0]),
                         source, gaps)


def save_ensemble(path: str | os.PathLike, model: EnsembleModel,
                  extra: dict | None = None) -> pathlib.Path:
    """Write the state atomically (temporary file renamed over ``path``)."""
    arrays = {"mean": model.mean, "scale": model.scale, "weights": model.weights,
              "bias": np.array(model.bias)}
    layers = []
    names = list(model.outputs) + ([f"gaps:{model.gaps}"] if model.gaps else [])
    for i, (name, gaussian) in enumerate(zip(names, model.gaussians)):
        for key, value in gaussian.arrays().items():
            arrays[f"layer{i}.{key}"] = np.array(value, order="C", copy=None)
        layers.append({"output": name, "dim": gaussian.dim_, "n_reference": gaussian.n_reference_,
                       "params": gaussian.params()})
    header = {
        "format": FORMAT, "version": VERSION, "source": model.source,
        "outputs": model.outputs, "logits": model.logits, "gaps": model.gaps, "layers": layers,
        "features": model.feature_names,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
    }
    return write_state_file(path, header, arrays)


def load_ensemble(path: str | os.PathLike) -> tuple[EnsembleModel, dict]:
    """Load and verify a state (format, version, checksums)."""
    header, arrays = read_state_file(path, FORMAT, VERSION, "feature-ensemble")
    gaussians = []
    for i, layer in enumerate(header["layers"]):
        prefix = f"layer{i}."
        own = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        gaussians.append(Mahalanobis.from_state(layer["params"], own, int(layer["dim"]),
                                                int(layer["n_reference"])))
    model = EnsembleModel(list(header["outputs"]), header.get("logits"), gaussians,
                          arrays["mean"].astype(np.float64), arrays["scale"].astype(np.float64),
                          arrays["weights"].astype(np.float64), float(arrays["bias"]),
                          str(header.get("source", "")), header.get("gaps"))
    return model, header


class FeatureEnsembleOptions(StageOptions):
    #: Outputs with a Mahalanobis term, in the state's order (checked when the stage is built).
    outputs: list[str] = ["conv1_stats", "conv2_stats", "features"]
    #: Output for the logit-margin term; None = no margin term.
    logits: str | None = "logits"
    #: Logits output for the log-gap Mahalanobis term (by predicted class); None = none.
    gaps: str | None = None
    #: State file (required; a missing one fails scoring until it is fitted).
    state: str


class FeatureEnsembleStage(ResponseStage):
    accepts = NUMERIC_DATATYPES

    def __init__(self, options: FeatureEnsembleOptions):
        self.options = options
        self.state = pathlib.Path(options.state)
        self.model: EnsembleModel | None = None
        if self.state.exists():
            model, _ = load_ensemble(self.state)
            fitted = (model.outputs, model.logits, model.gaps)
            named = (list(options.outputs), options.logits, options.gaps)
            if fitted != named:
                raise ValueError(f"{options.state}: fitted on outputs {model.outputs} + logits "
                                 f"{model.logits!r} + gaps {model.gaps!r}, but the stage names "
                                 f"{options.outputs} + {options.logits!r} + {options.gaps!r}: "
                                 "refit the state or fix the options")
            self.model = model

    def wanted(self) -> list[str]:
        return output_names(self.options.outputs, self.options.logits, self.options.gaps)

    def prepare(self, request, inputs, request_id) -> AddedOutputs:
        return ask_for_outputs(request, self.wanted())

    def score_arrays(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Per-row log-odds, as ``on_response`` computes them."""
        if self.model is None:
            raise RuntimeError(f"detect.feature_ensemble: no fitted state at {self.state}")
        return self.model.score(arrays)

    async def on_response(self, state: AddedOutputs, response, call_upstream) -> ResponseResult:
        wanted = set(self.wanted())
        arrays = take_outputs(response, wanted, state)
        missing = wanted - set(arrays)
        if missing:
            raise ValueError(f"the upstream's answer has no output(s) {sorted(missing)}")
        for name, array in arrays.items():
            if array.dtype.kind not in "fiub":
                raise ValueError(f"output '{name}' is not numeric")
            if array.ndim < 2:
                arrays[name] = array[None]
        scores = self.score_arrays(arrays)
        score = float(np.max(scores)) if len(scores) else 0.0
        if not np.isfinite(score):
            score = float(np.finfo(np.float64).max)
        return ResponseResult(score, ["anomaly:feature_ensemble"])


register("detect.feature_ensemble", "response", FeatureEnsembleOptions, FeatureEnsembleStage)
