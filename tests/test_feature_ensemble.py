"""`detect.feature_ensemble` on synthetic data: per-layer Gaussians + logistic combiner, the
state file, and the stage's request/response rewriting (no processes)."""
from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest

from bastion.detectors.anomaly_state import StateError
from bastion.detectors.feature_ensemble import (FeatureEnsembleOptions, FeatureEnsembleStage,
                                                ensemble_features, fit_ensemble, load_ensemble,
                                                save_ensemble)
from bastion.protos import codec, pb
from tests.harness import REPO

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


def _confusable(n):
    """Logits of a toy 3-class model whose classes 0 and 1 are often confused (the runner-up of
    a 0 is a 1 at a small margin, and back), while 2 is confident and never near either."""
    classes = RNG.integers(0, CLASSES, size=n)
    logits = np.zeros((n, CLASSES))
    margin = RNG.gamma(2.0, 1.0, size=n)
    for row, c in enumerate(classes):
        if c == 2:
            logits[row] = [0.0, 0.0, 8.0]
        else:
            logits[row, c], logits[row, 1 - c] = 8.0, 8.0 - margin[row]
    logits += RNG.normal(scale=0.3, size=(n, CLASSES))
    return {"logits": logits}, classes


def _pair_attack(n):
    """A 2 pushed just past the boundary into class 0: the margin is one a benign 0 often has,
    but its runner-up is 2, which a benign 0 never has near."""
    margin = RNG.gamma(2.0, 1.0, size=n)
    logits = np.stack([np.full(n, 6.0), np.zeros(n), 6.0 - margin], axis=1)
    return {"logits": logits + RNG.normal(scale=0.3, size=(n, CLASSES))}


def _gap_models():
    fit_outputs, classes = _confusable(900)
    combiner_benign, _ = _confusable(300)
    attacked = _pair_attack(300)
    margin = fit_ensemble(fit_outputs, classes, combiner_benign, attacked, [], "logits",
                          source="toy")
    gaps = fit_ensemble(fit_outputs, classes, combiner_benign, attacked, [], None,
                        source="toy", gaps="logits")
    return margin, gaps


def test_gap_term_sees_which_class_the_runner_up_is():
    """The margin cannot tell the pair attack from benign 0/1 confusions; the gaps, scored
    against the predicted class's Gaussian, can."""
    margin, gaps = _gap_models()
    assert gaps.feature_names == ["maha_gaps:logits"] and gaps.needed == ["logits"]
    clean, attacked = _confusable(600)[0], _pair_attack(600)
    assert _auroc(margin.score(clean), margin.score(attacked)) < 0.75
    assert _auroc(gaps.score(clean), gaps.score(attacked)) > 0.97


def test_gap_state_round_trip_and_stage_checks(tmp_path):
    _, gaps = _gap_models()
    path = save_ensemble(tmp_path / "g.npz", gaps)
    loaded, header = load_ensemble(path)
    clean, _ = _confusable(50)
    np.testing.assert_allclose(loaded.score(clean), gaps.score(clean))
    assert header["gaps"] == "logits" and loaded.gaps == "logits"
    assert loaded.gaussians[-1].class_mode == "predicted"
    stage = FeatureEnsembleStage(FeatureEnsembleOptions(state=str(path), outputs=[],
                                                        logits=None, gaps="logits"))
    assert stage.wanted() == ["logits"]
    with pytest.raises(ValueError, match="refit"):  # the options must name the fitted terms
        FeatureEnsembleStage(FeatureEnsembleOptions(state=str(path), outputs=[], logits="logits"))


def test_adaptive_attack_scores_the_gap_term_like_the_stage():
    """tools/image_adaptive.py's differentiable copy (what the adaptive attack optimises
    against) equals the stage's score, gap term included."""
    import torch
    sys.path.insert(0, str(REPO / "tools"))
    from image_adaptive import torch_ensemble
    fit_outputs, classes = _benign(600)
    fit_outputs["logits"] = _confusable(600)[0]["logits"]
    model = fit_ensemble(fit_outputs, classes, _benign(300)[0], _noise_attack(300),
                         ["low", "high"], "logits", source="toy", gaps="logits")
    rows = {**_noise_attack(20), **_pair_attack(20)}
    rows["low"], rows["high"] = _benign(20)[0]["low"], _benign(20)[0]["high"]
    copy = torch_ensemble(model)({k: torch.tensor(v) for k, v in rows.items()})
    np.testing.assert_allclose(copy.numpy(), model.score(rows), rtol=1e-9, atol=1e-9)
