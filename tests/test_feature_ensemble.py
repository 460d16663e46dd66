"""`detect.feature_ensemble` on synthetic data: per-layer Gaussians + logistic combiner, the
state file, and the stage's request/response rewriting (no processes)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bastion.detectors.anomaly_state import StateError
from bastion.detectors.feature_ensemble import (FeatureEnsembleOptions, FeatureEnsembleStage,
                                                ensemble_features, fit_ensemble, load_ensemble,
                                                save_ensemble)
from bastion.protos import codec, pb

RNG = np.random.default_rng(3)
CLASSES = 3


def _benign(n, shift_low=0.0):
    """Two 'layers' and logits of a toy 3-class model: class means far apart, confident."""
    classes = RNG.integers(0, CLASSES, size=n)
    low = RNG.normal(size=(n, 6)) + shift_low
    high = RNG.normal(size=(n, 4)) + 5 * np.eye(CLASSES, 4)[classes]
    logits = 8 * np.eye(CLASSES)[classes] + RNG.normal(scale=0.5, size=(n, CLASSES))
    return {"low": low, "high": high, "logits": logits}, classes


def _noise_attack(n):
    """Like the generic fitting attack: the low layer is off, the answer still confident."""
    outputs, _ = _benign(n, shift_low=3.0)
    return outputs


def _boundary_attack(n):
    """An attack never fitted on: low layer normal, but the logits sit on a decision boundary
    (what minimal-perturbation attacks do)."""
    outputs, classes = _benign(n)
    top2 = np.zeros((n, CLASSES))
    top2[np.arange(n), classes] = 4.0
    top2[np.arange(n), (classes + 1) % CLASSES] = 4.0 - RNG.uniform(0, 0.05, n)
    outputs["logits"] = top2
    return outputs


def _fitted(tmp_path=None):
    fit_outputs, classes = _benign(600)
    combiner_benign, _ = _benign(300)
    model = fit_ensemble(fit_outputs, classes, combiner_benign, _noise_attack(300),
                         ["low", "high"], "logits", source="upstream:toy:low+high+logits")
    return model


def _auroc(clean, attacked):
    from sklearn.metrics import roc_auc_score
    return roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(attacked))], np.r_[clean, attacked])


def test_combiner_separates_the_fitted_attack_and_weighs_the_layer_that_moved():
    model = _fitted()
    clean, _ = _benign(400)
    assert _auroc(model.score(clean), model.score(_noise_attack(400))) > 0.97
    weights = dict(zip(model.feature_names, model.weights))
    assert weights["maha:low"] > 1.0  # the layer the fitting attack moves dominates
    assert model.feature_names == ["maha:low", "maha:high", "margin"]


def test_margin_term_detects_an_attack_the_combiner_never_saw():
    """Fitted on benign + the noise attack only; the boundary attack still ranks high because
    its margin is smaller than any clean row's (margin weight negative: small margin = bad)."""
    model = _fitted()
    clean, _ = _benign(400)
    boundary = _boundary_attack(400)
    features = ensemble_features(boundary, model.outputs, model.gaussians, model.logits)
    assert features[:, 2].max() < ensemble_features(clean, model.outputs, model.gaussians,
                                                    model.logits)[:, 2].min()
    without_margin = fit_ensemble(*_benign(600), _benign(300)[0], _noise_attack(300),
                                  ["low", "high"], None, source="toy")
    assert _auroc(without_margin.score(clean), without_margin.score(boundary)) < 0.8
    assert _auroc(model.score(clean), model.score(boundary)) > _auroc(
        without_margin.score(clean), without_margin.score(boundary))


def test_state_round_trip_and_tamper_check(tmp_path):
    model = _fitted()
    path = save_ensemble(tmp_path / "e.npz", model, extra={"fit": "toy"})
    loaded, header = load_ensemble(path)
    clean, _ = _benign(50)
    np.testing.assert_allclose(loaded.score(clean), model.score(clean))
    assert header["features"] == model.feature_names and header["extra"]["fit"] == "toy"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["weights"] = arrays["weights"] * 2
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(StateError, match="checksum"):
        load_ensemble(tmp_path / "bad.npz")


def test_stage_refuses_a_state_fitted_on_other_outputs(tmp_path):
    path = save_ensemble(tmp_path / "e.npz", _fitted())
    with pytest.raises(ValueError, match="refit"):
        FeatureEnsembleStage(FeatureEnsembleOptions(state=str(path), outputs=["high", "low"]))


def test_stage_asks_for_its_outputs_scores_and_strips_them(tmp_path):
    model = _fitted()
    path = save_ensemble(tmp_path / "e.npz", model)
    stage = FeatureEnsembleStage(FeatureEnsembleOptions(state=str(path), outputs=["low", "high"]))
    request = pb.ModelInferRequest(model_name="toy")
    request.outputs.add(name="logits")  # the client wants the logits only
    state = stage.prepare(request, {}, "r1")
    assert [o.name for o in request.outputs] == ["logits", "low", "high"]
    outputs = _noise_attack(2)
    reply = pb.ModelInferResponse(model_name="toy")
    codec.encode_response(reply, {k: v.astype(np.float32) for k, v in outputs.items()})

    async def no_upstream(_request):
        raise AssertionError("no extra upstream call")
    result = asyncio.run(stage.on_response(state, reply, no_upstream))
    assert [o.name for o in reply.outputs] == ["logits"]
    expected = model.score({k: v.astype(np.float32) for k, v in outputs.items()}).max()
    assert result.score == pytest.approx(expected, rel=1e-6)
