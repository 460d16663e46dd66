"""Response stages that ask the model more than once: `detect.squeeze` and `smooth.randomized`.

End to end (`bastion serve` in front of `bastion upstream`, whose --request-log counts the calls
it received) with four models: the Fashion-MNIST demo CNN, `const` (two inputs; `logits` is its
`bias` input, so it ignores the image entirely, plus a `mean` output that does depend on the
image), and `pixels` (`logits` = the first 10 pixels of the image, so under strong noise its
class is a lottery). What the client gets is compared with a direct call to the upstream,
output by output, byte for byte after parsing. The smoothing statistics are checked in process
against scipy references, with a scripted upstream that sets the counts exactly.
"""
from __future__ import annotations

import asyncio
import json
import math
import urllib.request

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from scipy.stats import beta, binom, norm

from bastion import traffic
from bastion.detectors.smoothing import (RandomizedSmoothing, SmoothingOptions, certify,
                                         lower_confidence_bound)
from bastion.detectors.squeeze import FeatureSqueezer, SqueezeOptions
from bastion.protos import codec, pb
from tests.harness import REPO, Sidecar, Upstream

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
CNN = REPO / "bastion" / "demo_models" / "fashion-mnist"
SQUEEZERS = 3  # the default: bit_depth:1, median:2, jpeg:75
SIGMA = 0.25
ALPHA = 0.001

CONFIG = """
models:
  fmnist:
    mode: monitor
    pipeline: [{detect.squeeze: {}}]
  fmnist-unbatched:
    mode: monitor
    pipeline: [{detect.squeeze: {batched: false}}]
  fmnist-broken:
    mode: enforce
    pipeline: [{detect.squeeze: {output: no_such_output, on_error: open}}]
  fmnist-enforce:
    mode: enforce
    pipeline: [{detect.squeeze: {threshold: 0.5, action: block}}]
  const:
    mode: monitor
    pipeline: [{detect.squeeze: {}}]
  const-smooth:
    mode: monitor
    pipeline: [{smooth.randomized: {sigma: 0.25}}]
  pixels-status:
    mode: enforce
    pipeline: [{smooth.randomized: {sigma: 1.0, n0: 20, n: 100}}]
  pixels-flag:
    mode: enforce
    pipeline: [{smooth.randomized: {sigma: 1.0, n0: 20, n: 100, abstain: flag, threshold: 0.5,
                                    action: flag}}]
  pixels-certified:
    mode: enforce
    pipeline: [{smooth.randomized: {sigma: 0.1, n0: 20, n: 100}}]
"""


# ---------------------------------------------------------------------------------------------
# Test models


def _save(model: onnx.ModelProto, path) -> None:
    path.mkdir(parents=True)
    onnx.save(model, path / "model.onnx")


def const_model() -> onnx.ModelProto:
    """logits = bias (+ 0 x mean(image)); mean = the image's mean: [b, 1]."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 1, 28, 28])
    bias = helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["b", 10])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 10])
    mean = helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["b", 1])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean4"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Flatten", ["mean4"], ["mean"], axis=1),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
             helper.make_node("Add", ["bias", "nothing"], ["logits"])]
    graph = helper.make_graph(nodes, "const", [image, bias], [logits, mean], [zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def pixels_model() -> onnx.ModelProto:
    """logits = the first 10 pixels of the (flattened) image."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 1, 28, 28])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 10])
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v])
              for n, v in (("start", 0), ("end", 10), ("axis", 1))]
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
             helper.make_node("Slice", ["flat", "start", "end", "axis"], ["logits"])]
    graph = helper.make_graph(nodes, "pixels", [image], [logits], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("squeeze")
    models = root / "models"
    for name in ("fmnist", "fmnist-unbatched", "fmnist-enforce", "fmnist-broken"):
        (models / name).mkdir(parents=True)
        (models / name / "model.onnx").symlink_to(CNN / "model.onnx")
    for name in ("const", "const-smooth"):
        _save(const_model(), models / name)
    for name in ("pixels-status", "pixels-flag", "pixels-certified"):
        _save(pixels_model(), models / name)
    log = root / "requests.jsonl"
    upstream = Upstream(models=str(models), request_log=log)
    try:
        sidecar = Sidecar(upstream.address, config=CONFIG)
    except BaseException:
        upstream.stop()
        raise
    channel = grpc.insecure_channel(sidecar.address)
    direct = grpc.insecure_channel(upstream.address)
    try:
        yield Stack(upstream, sidecar, channel, direct)
    finally:
        channel.close()
        direct.close()
        assert sidecar.stop() == 0
        assert upstream.stop() == 0


class Stack:
    def __init__(self, upstream, sidecar, channel, direct):
        self.upstream = upstream
        self.sidecar = sidecar
        self._via = channel.unary_unary(MODEL_INFER)
        self._direct = direct.unary_unary(MODEL_INFER)

    def infer(self, request: pb.ModelInferRequest) -> tuple[pb.ModelInferResponse, int]:
        """(the sidecar's answer, how many upstream calls it took)."""
        before = self.upstream.requests_seen()
        reply = pb.ModelInferResponse.FromString(
            self._via(request.SerializeToString(), timeout=30))
        return reply, self.upstream.requests_seen() - before

    def direct(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        return pb.ModelInferResponse.FromString(self._direct(request.SerializeToString(),
                                                             timeout=30))

    def metric(self, name: str, **labels) -> float:
        with urllib.request.urlopen(f"http://{self.sidecar.admin}/metrics", timeout=10) as r:
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{"):
                got = line[len(name) + 1:line.index("}")]
                if ",".join(sorted(got.split(","))) == want:
                    total += float(line.rsplit(" ", 1)[1])
        return total


def request(model: str, image: np.ndarray, **others: np.ndarray) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, id="client-id")
    codec.encode_request(message, {"image": image.astype(np.float32), **others})
    return message


def noisy_image(seed: int = 0, rows: int = 1) -> np.ndarray:
    images, _ = traffic.load_images()
    noise = np.random.default_rng(seed).normal(0, 0.15, (rows, 1, 28, 28))
    return np.clip(images[:rows] + noise, 0, 1).astype(np.float32)


def assert_same_outputs(got: pb.ModelInferResponse, want: pb.ModelInferResponse,
                        extra: tuple[str, ...] = ()) -> None:
    """Same outputs, names, datatypes, shapes and bytes (after parsing), in the same order."""
    mine = codec.decode_response(got)
    theirs = codec.decode_response(want)
    assert [n for n in mine if n not in extra] == list(theirs)
    for name, array in theirs.items():
        spec = next(t for t in got.outputs if t.name == name)
        ref = next(t for t in want.outputs if t.name == name)
        assert (spec.datatype, list(spec.shape)) == (ref.datatype, list(ref.shape)), name
        assert mine[name].tobytes() == array.tobytes(), name


def score(reply: pb.ModelInferResponse, stage: str = "detect.squeeze") -> float:
    return reply.parameters[f"bastion.score.{stage}"].double_param


# ---------------------------------------------------------------------------------------------
# Feature squeezing, end to end


def test_squeeze_scores_zero_when_the_model_ignores_the_detail(stack):
    bias = np.random.default_rng(1).normal(size=(3, 10)).astype(np.float32)
    message = request("const", noisy_image(rows=3), bias=bias)
    reply, calls = stack.infer(message)
    assert calls == 1
    assert score(reply) == 0.0
    # Both outputs back to the client's 3 rows, equal to the upstream's own answer; `mean` does
    # change under squeezing, so a variant row leaking into it would show.
    assert_same_outputs(reply, stack.direct(message))
    assert codec.decode_response(reply)["logits"].tobytes() == bias.tobytes()


def test_squeeze_positive_for_the_cnn_on_a_noisy_image_in_one_upstream_call(stack):
    message = request("fmnist", noisy_image())
    reply, calls = stack.infer(message)
    assert calls == 1, "batched squeezing must cost one upstream request"
    assert score(reply) > 0.2
    assert reply.parameters["bastion.verdict"].string_param == "allow"  # monitor, no threshold
    assert_same_outputs(reply, stack.direct(message))
    assert reply.id == "client-id"


def test_unbatched_sends_one_request_per_squeezer_and_scores_the_same(stack):
    message = request("fmnist", noisy_image(seed=3, rows=2))
    batched, batched_calls = stack.infer(message)
    message.model_name = "fmnist-unbatched"
    unbatched, calls = stack.infer(message)
    assert (batched_calls, calls) == (1, 1 + SQUEEZERS)
    assert math.isclose(score(batched), score(unbatched), rel_tol=1e-9, abs_tol=1e-12)
    message.model_name = "fmnist"
    assert_same_outputs(batched, stack.direct(message))
    message.model_name = "fmnist-unbatched"
    assert_same_outputs(unbatched, stack.direct(message))


@pytest.mark.parametrize("model", ["fmnist", "fmnist-unbatched"])
def test_output_added_for_scoring_is_removed_again(stack, model):
    message = request(model, noisy_image(seed=5))
    message.outputs.add(name="features")
    reply, _ = stack.infer(message)
    assert [t.name for t in reply.outputs] == ["features"]
    assert score(reply) > 0.2
    assert_same_outputs(reply, stack.direct(message))


def test_failing_stage_after_prepare_still_answers_the_original(stack):
    """The squeeze stage batches variants into the forwarded request, then fails (its output
    does not exist): the sidecar must not hand the client the batched answer, but ask again."""
    message = request("fmnist-broken", noisy_image(seed=5))
    counted = stack.metric("bastion_upstream_requests_total", method="ModelInfer", code="OK")
    got, calls = stack.infer(message)
    direct = message.__class__(); direct.CopyFrom(message); direct.model_name = "fmnist"
    assert_same_outputs(got, stack.direct(direct))
    assert calls == 2  # the batched call, then the client's request again
    assert stack.metric("bastion_upstream_requests_total", method="ModelInfer",
                        code="OK") - counted == 2
    assert got.parameters["bastion.reasons"].string_param == "stage_error:fail_open"


def test_typed_contents_request(stack):
    """A request in typed (non-raw) form: squeezing re-encodes it; the answer is unchanged."""
    image = noisy_image(seed=7)
    message = pb.ModelInferRequest(model_name="fmnist")
    item = message.inputs.add(name="image", datatype="FP32", shape=[1, 1, 28, 28])
    item.contents.fp32_contents.extend(image.reshape(-1).tolist())
    reply, calls = stack.infer(message)
    assert calls == 1 and score(reply) > 0.2
    assert_same_outputs(reply, stack.direct(message))


def test_enforce_blocks_and_extra_items_are_counted(stack):
    before = stack.metric("bastion_extra_upstream_items_total", model="fmnist-enforce",
                          stage="detect.squeeze")
    message = request("fmnist-enforce", noisy_image(seed=9, rows=2))
    with pytest.raises(grpc.RpcError) as caught:
        stack.infer(message)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "squeeze:" in caught.value.details()
    after = stack.metric("bastion_extra_upstream_items_total", model="fmnist-enforce",
                         stage="detect.squeeze")
    assert after - before == 2 * SQUEEZERS


def test_in_process_scores_match_the_sidecar(stack):
    """The stage's pure pieces (what the evaluation uses) give the sidecar's score."""
    import onnxruntime
    image = noisy_image(seed=11)
    reply, _ = stack.infer(request("fmnist", image))
    stage = FeatureSqueezer(SqueezeOptions())
    session = onnxruntime.InferenceSession(str(CNN / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    from bastion.detectors.squeeze import squeeze_distances
    logits = [session.run(["logits"], {"image": x})[0] for x in [image, *stage.variants(image)]]
    assert math.isclose(squeeze_distances(logits[0], logits[1:]).max(), score(reply),
                        rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Randomized smoothing, end to end


def test_smoothing_certifies_a_constant_model(stack):
    bias = np.zeros((1, 10), np.float32)
    bias[0, 7] = 3.0
    message = request("const-smooth", noisy_image(), bias=bias)
    counted = stack.metric("bastion_upstream_requests_total", method="ModelInfer", code="OK")
    reply, calls = stack.infer(message)
    assert calls == 1 + math.ceil((100 + 1000) / 256)
    # Every upstream call is counted, the stage's own samples too.
    assert stack.metric("bastion_upstream_requests_total", method="ModelInfer",
                        code="OK") - counted == calls
    # Every noisy copy gets class 7: nA = n, pA_lower = alpha ** (1 / n).
    p_lower = ALPHA ** (1 / 1000)
    params = reply.parameters
    assert params["bastion.smoothed_class"].int64_param == 7
    assert math.isclose(params["bastion.certified_radius"].double_param,
                        SIGMA * norm.ppf(p_lower), rel_tol=1e-9)
    assert params["bastion.smoothing_abstain"].bool_param is False
    assert math.isclose(score(reply, "smooth.randomized"), 1 - p_lower, rel_tol=1e-9)
    outputs = codec.decode_response(reply)
    assert outputs["smoothed_class"].tolist() == [7]
    assert outputs["smoothed_class"].dtype == np.int64
    assert math.isclose(float(outputs["certified_radius"][0]), SIGMA * norm.ppf(p_lower))
    # The clean answer is the upstream's own.
    assert_same_outputs(reply, stack.direct(message), extra=("smoothed_class", "certified_radius"))
    assert stack.metric("bastion_extra_upstream_items_total", model="const-smooth",
                        stage="smooth.randomized") >= 1100


def test_smoothing_abstains_with_the_configured_status(stack):
    message = request("pixels-status", np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(grpc.RpcError) as caught:
        stack.infer(message)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "smoothing_abstain" in caught.value.details()


def test_smoothing_abstain_flag_mode_answers_with_the_flag(stack):
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(stack.sidecar.address)
    try:
        item = tc.InferInput("image", [1, 1, 28, 28], "FP32")
        item.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
        result = client.infer("pixels-flag", [item])
    finally:
        client.close()
    params = result.get_response().parameters
    assert params["bastion.smoothing_abstain"].bool_param is True
    assert params["bastion.smoothed_class"].int64_param == -1
    assert params["bastion.verdict"].string_param == "flag"
    assert "smoothing_abstain" in params["bastion.reasons"].string_param
    assert result.as_numpy("smoothed_class").tolist() == [-1]
    assert result.as_numpy("logits").shape == (1, 10)


def test_smoothing_certifies_a_clear_pixel(stack):
    image = np.zeros((1, 1, 28, 28), np.float32)
    image[0, 0, 0, 4] = 1.0  # pixel 4 is bright: class 4 survives sigma = 0.1 every time
    reply, calls = stack.infer(request("pixels-certified", image))
    assert calls == 1 + 1  # 120 copies fit one batch of 256
    assert reply.parameters["bastion.smoothed_class"].int64_param == 4
    p_lower = ALPHA ** (1 / 100)
    assert math.isclose(reply.parameters["bastion.certified_radius"].double_param,
                        0.1 * norm.ppf(p_lower), rel_tol=1e-9)
    assert "bastion.verdict" not in reply.parameters  # enforce + allow: untouched but for ours


# ---------------------------------------------------------------------------------------------
# Smoothing statistics, in process


def test_lower_bound_matches_references():
    for n_a, n, alpha in [(1000, 1000, 0.001), (990, 1000, 0.001), (600, 1000, 0.001),
                          (530, 1000, 0.05), (7, 10, 0.01), (1, 100, 0.001)]:
        got = lower_confidence_bound(n_a, n, alpha)
        assert got == pytest.approx(beta.ppf(alpha, n_a, n - n_a + 1), rel=1e-12)
        # Clopper-Pearson by definition: P(X >= nA | p = bound) = alpha.
        assert binom.sf(n_a - 1, n, got) == pytest.approx(alpha, rel=1e-6)
    assert lower_confidence_bound(0, 1000, 0.001) == 0.0


def _boundary(n: int, alpha: float) -> int:
    """The smallest nA whose lower bound reaches 0.5."""
    return next(k for k in range(n + 1) if beta.ppf(alpha, k, n - k + 1) >= 0.5)


def test_certify_at_the_boundary():
    n0, n = 100, 1000
    k = _boundary(n, ALPHA)
    assert beta.ppf(ALPHA, k - 1, n - k + 2) < 0.5 <= beta.ppf(ALPHA, k, n - k + 1)
    selection = np.full(n0, 3)
    for n_a, abstains in ((k - 1, True), (k, False)):
        estimation = np.array([3] * n_a + [5] * (n - n_a))
        cert = certify(selection, estimation, SIGMA, ALPHA, classes=10)
        p_lower = beta.ppf(ALPHA, n_a, n - n_a + 1)
        assert cert.p_lower == pytest.approx(p_lower, rel=1e-12)
        assert cert.abstained is abstains
        assert cert.smoothed_class == (-1 if abstains else 3)
        assert cert.radius == (0.0 if abstains else pytest.approx(SIGMA * norm.ppf(p_lower)))
    # The top class comes from the selection copies, not the estimation ones.
    cert = certify(np.full(n0, 5), np.array([3] * n), SIGMA, ALPHA)
    assert cert.abstained and cert.counts[5] == 0


class ScriptedUpstream:
    """Answers noisy copies by position: copy j of the n0 + n gets class `plan(j)`."""

    def __init__(self, plan, classes: int = 10):
        self.plan = plan
        self.classes = classes
        self.seen = 0
        self.calls = 0

    async def __call__(self, message: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self.calls += 1
        rows = codec.decode_request(message)["image"].shape[0]
        logits = np.zeros((rows, self.classes), np.float32)
        for row in range(rows):
            logits[row, self.plan(self.seen + row)] = 1.0
        self.seen += rows
        reply = pb.ModelInferResponse(model_name=message.model_name)
        codec.encode_response(reply, {"logits": logits})
        return reply


def _run_stage(stage, message, request_id, upstream):
    state = stage.prepare(message, codec.decode_request(message), request_id)
    reply = pb.ModelInferResponse(model_name=message.model_name)
    codec.encode_response(reply, {"logits": np.zeros((1, 10), np.float32)})
    result = asyncio.run(stage.on_response(state, reply, upstream))
    return result, reply


@pytest.mark.parametrize("below", [True, False])
def test_stage_abstains_just_below_half(below):
    n0, n = 100, 1000
    k = _boundary(n, ALPHA) - (1 if below else 0)
    stage = RandomizedSmoothing(SmoothingOptions(sigma=SIGMA, n0=n0, n=n, concurrency=1))
    upstream = ScriptedUpstream(lambda j: 3 if j < n0 + k else 5)
    result, reply = _run_stage(stage, request("m", np.zeros((1, 1, 28, 28))), "rid", upstream)
    p_lower = beta.ppf(ALPHA, k, n - k + 1)
    assert upstream.calls == math.ceil((n0 + n) / 256) and result.extra_items == n0 + n
    assert result.score == pytest.approx(1 - p_lower, rel=1e-12)
    outputs = codec.decode_response(reply)
    if below:
        assert p_lower < 0.5
        assert result.refusal == ("UNAVAILABLE", "smoothing_abstain")
        assert outputs["smoothed_class"].tolist() == [-1]
        assert result.parameters["bastion.smoothing_abstain"] is True
    else:
        assert 0.5 <= p_lower < 0.51
        assert result.refusal is None
        assert result.parameters["bastion.smoothed_class"] == 3
        assert result.parameters["bastion.certified_radius"] == pytest.approx(
            SIGMA * norm.ppf(p_lower), rel=1e-12)
        assert outputs["certified_radius"][0] == pytest.approx(SIGMA * norm.ppf(p_lower))


def test_replace_rewrites_the_class_output():
    n0, n = 10, 100
    stage = RandomizedSmoothing(SmoothingOptions(sigma=SIGMA, n0=n0, n=n, rewrite="replace",
                                                 concurrency=1))
    upstream = ScriptedUpstream(lambda j: 2 if j < n0 + 80 else 6)
    result, reply = _run_stage(stage, request("m", np.zeros((1, 1, 28, 28))), "rid", upstream)
    logits = codec.decode_response(reply)["logits"]
    assert logits.dtype == np.float32 and logits.shape == (1, 10)
    assert logits[0, 2] == pytest.approx(0.8) and logits[0, 6] == pytest.approx(0.2)
    assert int(np.argmax(logits)) == result.parameters["bastion.smoothed_class"] == 2


def _cnn_upstream():
    import onnxruntime
    session = onnxruntime.InferenceSession(str(CNN / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    seen = []

    async def call(message):
        images = codec.decode_request(message)["image"]
        seen.append(images.copy())
        names = [o.name for o in message.outputs] or ["logits", "features"]
        reply = pb.ModelInferResponse(model_name=message.model_name)
        codec.encode_response(reply, dict(zip(names, session.run(names, {"image": images}))))
        return reply
    return call, seen


def test_same_request_id_same_answer():
    images, _ = traffic.load_images()
    ambiguous = (0.5 * images[0] + 0.5 * images[1])[None]  # two garments blended
    answers = []
    for request_id, batch_size in (("req-1", 256), ("req-1", 100), ("req-2", 256)):
        stage = RandomizedSmoothing(SmoothingOptions(sigma=0.5, batch_size=batch_size,
                                                     concurrency=1))
        call, seen = _cnn_upstream()
        message = request("fashion-mnist", ambiguous)
        state = stage.prepare(message, {}, request_id)
        reply = pb.ModelInferResponse()
        codec.encode_response(reply, {"logits": np.zeros((1, 10), np.float32)})
        result = asyncio.run(stage.on_response(state, reply, call))
        answers.append((result, reply.SerializeToString(), np.concatenate(seen)))
    (first, reply1, noise1), (again, reply2, noise2), (other, _, noise3) = answers
    # Same id: same noise (whatever the batching), same counts, same answer.
    assert np.array_equal(noise1, noise2)
    assert (first.score, first.parameters, first.refusal) == (again.score, again.parameters,
                                                              again.refusal)
    assert reply1 == reply2
    # Another id: other noise.
    assert not np.array_equal(noise1, noise3)
    # The noise is what the docs say: x + sigma * N(0, 1), clipped to [0, 1].
    assert noise1.shape == (1100, 1, 28, 28)
    assert 0.0 <= noise1.min() and noise1.max() <= 1.0


def test_config_errors_name_the_key():
    from bastion.config import Config, validate_pipelines
    config = Config.model_validate(json.loads(json.dumps({"models": {"m": {"pipeline": [
        {"detect.squeeze": {"squeezers": ["bit_depth:1", "median:1"]}},
        {"smooth.randomized": {"sigma": 0.5, "abstain_status": "NOPE"}},
        {"smooth.randomized": {"id": "s2"}},
    ]}}})))
    problems = validate_pipelines(config)
    assert any("models.m.pipeline.0.detect.squeeze.squeezers" in p and "median:1" in p
               for p in problems), problems
    assert any("pipeline.1.smooth.randomized.abstain_status" in p for p in problems), problems
    assert any("pipeline.2.smooth.randomized.sigma" in p for p in problems), problems
