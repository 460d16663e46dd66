"""Monitor mode scores the same tensor enforce mode forwards: tritonclient -> `bastion serve`
(monitor, then enforce) -> `bastion upstream`, with a squeezing transform before a response
stage. The monitor client still gets the answer to its own (unsqueezed) image."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc

from bastion.detectors.upstream_features import UpstreamFeatureOptions, UpstreamFeatureStage
from bastion.stage_config import package_file
from tests.harness import Sidecar, Upstream, fashion_mnist

STATE = "builtin:demo_models/fashion-mnist/conv1_stats.state.npz"
CONFIG = """\
models:
  fashion-mnist:
    mode: {mode}
    inputs:
      image: {{datatype: FP32, shape: [-1, 1, 28, 28], kind: tensor}}
    pipeline:
      - transform.bit_depth: {{bits: 3}}
      - detect.features: {{id: features, output: conv1_stats, method: mahalanobis,
                          state: "{state}", threshold: 1.0e9, action: flag}}
"""


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.stop()


def _ask(address: str, image: np.ndarray):
    client = tc.InferenceServerClient(address)
    try:
        tensor = tc.InferInput("image", list(image.shape), "FP32")
        tensor.set_data_from_numpy(image)
        result = client.infer("fashion-mnist", [tensor], outputs=[tc.InferRequestedOutput("logits")])
    finally:
        client.close()
    response = result.get_response()
    params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}
    return result.as_numpy("logits"), params, [o.name for o in response.outputs]


def _offline_score(outputs_of, image: np.ndarray) -> float:
    stage = UpstreamFeatureStage(UpstreamFeatureOptions(state=str(package_file(STATE)),
                                                        output="conv1_stats"))
    return float(stage.score_rows(outputs_of(image)).max())


def test_monitor_and_enforce_score_the_same_tensor(upstream):
    images, _ = fashion_mnist("t10k", 1)
    noisy = np.clip(images + np.random.default_rng(0).uniform(-0.06, 0.06, images.shape),
                    0, 1).astype(np.float32)
    scores, answers = {}, {}
    for mode in ("monitor", "enforce"):
        sidecar = Sidecar(upstream.address, config=CONFIG.format(mode=mode, state=STATE))
        try:
            answers[mode], params, names = _ask(sidecar.address, noisy)
        finally:
            sidecar.stop()
        assert names == ["logits"]  # the stage's extra output never reaches the client
        assert params["bastion.mode"] == mode
        scores[mode] = params["bastion.score.features"]
    assert scores["monitor"] == pytest.approx(scores["enforce"], rel=1e-9)

    # ... and that score is the squeezed image's, not the raw one's (which differs):
    direct = lambda image: _ask(upstream.address, image)[0]  # noqa: E731
    levels = 2 ** 3 - 1
    squeezed = (np.round(noisy * levels) / levels).astype(np.float32)
    np.testing.assert_array_equal(answers["enforce"], direct(squeezed))
    np.testing.assert_array_equal(answers["monitor"], direct(noisy))  # the client's own answer

    def conv1_stats(image):
        client = tc.InferenceServerClient(upstream.address)
        try:
            tensor = tc.InferInput("image", list(image.shape), "FP32")
            tensor.set_data_from_numpy(image)
            return client.infer("fashion-mnist", [tensor]).as_numpy("conv1_stats")
        finally:
            client.close()
    raw_score = _offline_score(conv1_stats, noisy)
    squeezed_score = _offline_score(conv1_stats, squeezed)
    assert abs(raw_score - squeezed_score) > 0.01 * squeezed_score
    assert scores["monitor"] == pytest.approx(squeezed_score, rel=1e-6)


def test_response_stage_refusals_feed_the_client_suspicion_tier(upstream):
    """A query-based attacker probing a response-stage detector gets tiered like one probing a
    request stage: after enough refusals the client itself is refused before any stage runs."""
    config = CONFIG.format(mode="enforce", state=STATE).replace(
        "threshold: 1.0e9, action: flag", "threshold: 0.0, action: block") + (
        "clients:\n  suspicion: {weights: {\"anomaly:\": 1.0}, throttle_at: 3.0, block_at: 3.0}\n")
    images, _ = fashion_mnist("t10k", 1)
    sidecar = Sidecar(upstream.address, config=config)
    try:
        messages = []
        for _ in range(5):
            with pytest.raises(tc.InferenceServerException) as err:
                _ask(sidecar.address, images)
            messages.append(err.value.message())
    finally:
        sidecar.stop()
    assert all("PERMISSION_DENIED" in m or "blocked" in m for m in messages)
    assert "blocked by features" in messages[0]
    assert "client blocked" in messages[-1]  # the tier, not the stage, refused the last one
