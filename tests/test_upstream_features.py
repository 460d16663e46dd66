"""`detect.features`: the model's own features, asked for, scored and removed again.

In process: the request/response rewriting and the state checks. End to end: `bastion
calibrate` fits the stage on the real upstream's answers to Fashion-MNIST training images
(Debian's dataset-fashion-mnist), then `bastion serve` uses that state and threshold in front of
`bastion upstream`, and tritonclient checks what a client gets.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as tc

from bastion import traffic
from bastion.detectors import anomaly, anomaly_models, anomaly_state
from bastion.detectors.upstream_features import (UpstreamFeatureOptions, UpstreamFeatureStage,
                                                 strip_outputs)
from bastion.protos import codec, pb
from tests.harness import Sidecar, Upstream, fashion_mnist

RNG = np.random.default_rng(7)


def _fit_state(path, dim=8, method="mahalanobis", source="upstream:toy:features", classes=None):
    reference = RNG.normal(size=(400, dim))
    model = anomaly_models.make_model(method, k=5).fit(reference, classes)
    return anomaly.save_state(path, model, source)


def _stage(path, **options) -> UpstreamFeatureStage:
    return UpstreamFeatureStage(UpstreamFeatureOptions(state=str(path), **options))


def _answer(**outputs) -> pb.ModelInferResponse:
    reply = pb.ModelInferResponse(model_name="toy")
    codec.encode_response(reply, outputs)
    return reply


def _finish(stage, state, reply):
    async def no_upstream(_request):
        raise AssertionError("detect.features needs no extra upstream call")
    return asyncio.run(stage.on_response(state, reply, no_upstream))


# ---------------------------------------------------------------------------------------------
# In process


def test_output_added_only_when_the_client_named_outputs_and_removed_again(tmp_path):
    stage = _stage(_fit_state(tmp_path / "s.npz"))
    logits = RNG.normal(size=(2, 3)).astype(np.float32)
    features = RNG.normal(size=(2, 8)).astype(np.float32)

    named = pb.ModelInferRequest(model_name="toy")
    named.outputs.add(name="logits")
    state = stage.prepare(named, {}, "r1")
    assert [o.name for o in named.outputs] == ["logits", "features"]
    reply = _answer(logits=logits, features=features)
    result = _finish(stage, state, reply)
    assert [o.name for o in reply.outputs] == ["logits"]
    assert len(reply.raw_output_contents) == 1
    assert codec.decode_response(reply)["logits"].tobytes() == logits.tobytes()
    assert result.score > 0 and result.reasons == ["anomaly:features:mahalanobis"]

    everything = pb.ModelInferRequest(model_name="toy")  # no names: all outputs come anyway
    state = stage.prepare(everything, {}, "r2")
    assert not everything.outputs
    reply = _answer(logits=logits, features=features)
    _finish(stage, state, reply)
    assert [o.name for o in reply.outputs] == ["logits", "features"]


def test_far_rows_score_higher_and_the_worst_row_counts(tmp_path):
    stage = _stage(_fit_state(tmp_path / "s.npz"))
    near = RNG.normal(size=(3, 8))
    far = near.copy()
    far[1] += 8.0
    scores = [_finish(stage, stage.prepare(pb.ModelInferRequest(), {}, "r"),
                      _answer(features=rows.astype(np.float32))).score for rows in (near, far)]
    assert scores[1] > 2 * scores[0]
    assert scores[1] == pytest.approx(stage.score_rows(far).max())


def test_typed_contents_are_stripped_too(tmp_path):
    stage = _stage(_fit_state(tmp_path / "s.npz"))
    request = pb.ModelInferRequest()
    request.outputs.add(name="logits")
    state = stage.prepare(request, {}, "r")
    reply = pb.ModelInferResponse()
    for name, count in (("features", 8), ("logits", 2)):
        out = reply.outputs.add(name=name, datatype="FP32", shape=[1, count])
        out.contents.fp32_contents.extend([0.5] * count)
    _finish(stage, state, reply)
    assert [o.name for o in reply.outputs] == ["logits"]
    assert list(reply.outputs[0].contents.fp32_contents) == [0.5, 0.5]


def test_strip_outputs_keeps_raw_contents_aligned():
    reply = _answer(a=np.zeros((1, 2), np.float32), b=np.ones((1, 3), np.int64),
                    c=np.full((1, 1), 7, np.int32))
    strip_outputs(reply, {"b"})
    decoded = codec.decode_response(reply)
    assert list(decoded) == ["a", "c"] and decoded["c"].tolist() == [[7]]


def test_class_conditional_predicted_mode_asks_for_logits(tmp_path):
    classes = np.repeat([0, 1], 200)
    model = anomaly_models.make_model("mahalanobis", class_mode="predicted").fit(
        RNG.normal(size=(400, 8)) + classes[:, None] * 3, classes)
    path = anomaly.save_state(tmp_path / "p.npz", model, "upstream:toy:features")
    stage = _stage(path)
    request = pb.ModelInferRequest()
    request.outputs.add(name="other")
    state = stage.prepare(request, {}, "r")
    assert [o.name for o in request.outputs] == ["other", "features", "logits"]
    row = np.full((1, 8), 3.0, np.float32)  # class 1's mean
    as_one = _finish(stage, state, _answer(other=np.zeros(1, np.float32), features=row,
                                           logits=np.array([[0.0, 5.0]], np.float32)))
    state = stage.prepare(request, {}, "r")
    as_zero = _finish(stage, state, _answer(other=np.zeros(1, np.float32), features=row,
                                            logits=np.array([[5.0, 0.0]], np.float32)))
    assert as_one.score < as_zero.score


def test_state_checks(tmp_path):
    path = _fit_state(tmp_path / "s.npz")
    with pytest.raises(ValueError, match="fitted on features from 'upstream:toy:features'.*"
                                         "upstream:\\*:conv1_stats"):
        _stage(path, output="conv1_stats")
    with pytest.raises(ValueError, match="fitted on features from"):
        _stage(path, source="upstream:other:features")
    with pytest.raises(anomaly_state.StateError, match="holds a 'mahalanobis' model"):
        _stage(path, method="knn")
    stage = _stage(path)
    with pytest.raises(ValueError, match="has 5 values per row; the state was fitted on 8"):
        _finish(stage, stage.prepare(pb.ModelInferRequest(), {}, "r"),
                _answer(features=np.zeros((1, 5), np.float32)))
    with pytest.raises(ValueError, match="no output 'features'"):
        _finish(stage, stage.prepare(pb.ModelInferRequest(), {}, "r"),
                _answer(logits=np.zeros((1, 5), np.float32)))
    unfitted = _stage(tmp_path / "missing.npz")
    with pytest.raises(RuntimeError, match="no fitted state.*bastion calibrate"):
        _finish(unfitted, unfitted.prepare(pb.ModelInferRequest(), {}, "r"),
                _answer(features=np.zeros((1, 8), np.float32)))


# ---------------------------------------------------------------------------------------------
# End to end: calibrate on the real upstream, then serve


CONFIG = """
upstream: {{target: "{upstream}"}}
models:
  fashion-mnist:
    mode: monitor
    pipeline:
      - detect.features: {{id: stats, output: conv1_stats, method: knn, k: 10,
                          state: "{state}"{threshold}}}
"""


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    upstream = Upstream()
    try:
        images, labels = fashion_mnist("train", 3000)
        np.savez(root / "benign.npz", image=images, labels=labels)
        state, out = root / "stats.npz", root / "stats.json"
        config = root / "calibrate.yaml"
        config.write_text(CONFIG.format(upstream=upstream.address, state=state, threshold=""))
        result = subprocess.run(
            [sys.executable, "-m", "bastion", "calibrate", "-c", str(config), "--model",
             "fashion-mnist", "--stage", "stats", "--data", str(root / "benign.npz"),
             "--target-fpr", "0.05", "--out", str(out)],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr + result.stdout
        serve = CONFIG.format(upstream=upstream.address, state=state,
                              threshold=f', threshold_file: "{out}", action: flag')
        sidecar = Sidecar(upstream.address, config=serve)
        try:
            yield upstream, sidecar, json.loads(out.read_text()), state
        finally:
            assert sidecar.stop() == 0
    finally:
        assert upstream.stop() == 0


def test_calibrate_fits_on_the_upstreams_answers(calibrated):
    _, _, written, state = calibrated
    assert written["scored"] == 1500 and written["target_fpr"] == 0.05
    assert 0.04 <= written["observed_fpr"] <= 0.05
    assert "conv1_stats" in written["fit"] and str(state) in written["fit"]
    model, header = anomaly.load_state(state)
    assert header["source"] == "upstream:fashion-mnist:conv1_stats"
    assert (model.method, model.dim_, model.n_reference_) == ("knn", 48, 1500)


def _infer(client, images, outputs=None):
    item = tc.InferInput("image", list(images.shape), "FP32")
    item.set_data_from_numpy(images.astype(np.float32))
    requested = [tc.InferRequestedOutput(n) for n in outputs] if outputs else None
    return client.infer(traffic.IMAGE_MODEL, [item], outputs=requested)


def test_served_stage_flags_noise_not_clean_images(calibrated):
    upstream, sidecar, written, _ = calibrated
    proxied = tc.InferenceServerClient(sidecar.address)
    direct = tc.InferenceServerClient(upstream.address)
    try:
        clean, _ = fashion_mnist("t10k", 200)
        noisy = np.clip(clean + 0.1 * np.sign(RNG.normal(size=clean.shape)), 0, 1)

        def scores(images):
            out = []
            for row in images:
                reply = _infer(proxied, row[None], outputs=["logits"]).get_response()
                out.append(reply.parameters["bastion.score.stats"].double_param)
            return np.array(out)

        clean_scores, noisy_scores = scores(clean), scores(noisy)
        threshold = written["threshold"]
        assert np.mean(clean_scores >= threshold) <= 0.12  # 5 % target, 200 unseen images
        assert np.mean(noisy_scores >= threshold) >= 0.9
        # What the client gets: the outputs it asked for, equal to the upstream's own answer.
        got = _infer(proxied, clean[:3], outputs=["logits"])
        want = _infer(direct, clean[:3], outputs=["logits"])
        assert got.as_numpy("conv1_stats") is None
        assert np.array_equal(got.as_numpy("logits"), want.as_numpy("logits"))
        everything = _infer(proxied, clean[:3])
        assert everything.as_numpy("conv1_stats").shape == (3, 48)
        assert everything.as_numpy("features").shape == (3, 64)
    finally:
        proxied.close()
        direct.close()


def test_calibrate_refuses_text_data_for_a_feature_stage(calibrated, tmp_path):
    upstream, _, _, _ = calibrated
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.format(upstream=upstream.address, state=tmp_path / "s.npz",
                                    threshold=""))
    (tmp_path / "b.jsonl").write_text('{"text": "hello"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "bastion", "calibrate", "-c", str(config), "--model",
         "fashion-mnist", "--stage", "stats", "--data", str(tmp_path / "b.jsonl")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "must be an .npz" in result.stderr
