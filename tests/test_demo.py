"""`bastion demo` runs end to end, shows verdicts and metrics, and stops what it started."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

from bastion import traffic
from bastion.demo import demo_config
from bastion.shipped_profiles import profile_model


def run_demo(*args, send_sigint_after=None):
    proc = subprocess.Popen([sys.executable, "-m", "bastion", "demo", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send_sigint_after is not None:
        time.sleep(send_sigint_after)
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/status").read()
    return "State:\tZ" not in status


def check_output(code, out):
    assert code == 0, out
    final = out.split("=== final ===")[1]
    # Benign traffic is answered by the model; every malformed request is refused by the sidecar.
    rows = {tuple(line.split()[:2]): line.split() for line in final.splitlines()
            if line.startswith(("fashion-mnist", "text-classifier"))}
    header = next(l.split() for l in final.splitlines() if l.startswith("model"))
    allowed, blocked = header.index("allowed"), header.index("blocked")
    assert int(rows[("fashion-mnist", "benign")][allowed]) > 0
    assert int(rows[("text-classifier", "benign")][allowed]) > 0
    assert int(rows[("text-classifier", "attack")][blocked]) > 0  # the defenses act
    # Adversarial images: mostly blocked by detect.features; the clean samples pass.
    sent = header.index("sent")
    image_attacks, image_benign = rows[("fashion-mnist", "attack")], rows[("fashion-mnist", "benign")]
    assert int(image_attacks[blocked]) >= 0.7 * int(image_attacks[sent]), final
    assert int(image_benign[blocked]) <= 0.1 * int(image_benign[sent]), final
    malformed = [r for k, r in rows.items() if k[1] == "malformed"]
    assert malformed, final
    invalid = header.index("invalid")
    assert all(r[2] == r[invalid] for r in malformed), final
    assert re.search(r"latency through bastion, fashion-mnist: p50 [\d.]+ ms", final)
    # Part of the traffic goes over the REST front, and its attacks are blocked there too.
    over_http = re.search(r"^over http: (.*)$", final, re.MULTILINE)
    assert over_http, final
    outcomes = dict((name, int(n)) for n, name in re.findall(r"(\d+) (\w+)", over_http.group(1)))
    assert outcomes.get("allowed", 0) > 0 and outcomes.get("blocked", 0) > 0, final
    # One line per text family: the llm-prompt profile blocks the attacks, not the benign prompts.
    families = {m.group(2): (m.group(1), int(m.group(3)), int(m.group(4))) for m in re.finditer(
        r"^\s+(attack|benign)\s+(\S+)\s+blocked\s+(\d+) of\s+(\d+)", final, re.MULTILINE)}
    for family in ("prompt_injection", "jailbreak_template", "encoding", "adv_suffix"):
        label, blocked_count, sent_count = families[family]
        # Encodings are the hardest family (about 3 in 4 blocked in the demo's sample).
        assert label == "attack" and blocked_count >= 0.6 * sent_count, (family, final)
    label, blocked_count, sent_count = families["benign_chat"]
    assert label == "benign" and blocked_count <= 0.1 * sent_count, final
    # Generation streams: the e-mail comes back redacted, the canary never comes back.
    assert re.search(r"redaction\s+\d+ chunks relayed: .*\[REDACTED:email\]", out), out
    assert "dana.miles" not in out
    assert re.search(r"canary leak\s+\d+ chunks relayed \('Here is my hidden configuration: the "
                     r"code word is '\), then stopped: bastion: output stopped: canary", out), out
    assert out.count("DEMO-CANARY") == 0
    assert re.search(r'bastion_verdicts_total\{action="block",cohort="all",enforced="true"', out)
    assert "top reasons:" in out
    for pid in re.findall(r"(?:upstream|sidecar) pid (\d+)", out):
        assert not pid_alive(int(pid)), f"demo left process {pid} running"
    assert "stopped upstream and sidecar" in out


def test_demo_runs_for_a_duration():
    check_output(*run_demo("--duration", "6", "--rate", "40"))


def test_demo_stops_cleanly_on_ctrl_c():
    code, out = run_demo("--rate", "40", send_sigint_after=12)
    check_output(code, out)


# The demo's image defense: the shipped detect.features state and threshold
# (tools/training/build_demo_defenses.py) against the shipped sample and attack images.

def _build_script():
    import importlib.util
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "training" / \
        "build_demo_defenses.py"
    spec = importlib.util.spec_from_file_location("build_demo_defenses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_features_state_was_fitted_through_the_demo_pipeline():
    # The state was fitted on images squeezed as the demo's request transform squeezes them.
    demo_models = yaml.safe_load(demo_config("l", "a", "u", "x"))["models"]
    assert demo_models[traffic.IMAGE_MODEL] == {"profile": "image-classifier"}
    pipeline = profile_model("image-classifier")["pipeline"]
    kinds = [next(iter(stage)) for stage in pipeline]
    detectors = [i for i, kind in enumerate(kinds) if kind.startswith("detect.feature")]
    assert detectors and kinds.index("transform.bit_depth") < min(detectors)
    bits = pipeline[kinds.index("transform.bit_depth")]["transform.bit_depth"]["bits"]
    assert bits == _build_script().DEMO_BIT_DEPTH


def test_shipped_features_state_flags_the_attack_images_not_the_samples():
    import onnxruntime as ort

    from bastion.detectors import anomaly
    from bastion.transforms.base import TransformContext
    from bastion.transforms.image import BitDepth
    model_dir = traffic._package_file("demo_models", traffic.IMAGE_MODEL)
    model, header = anomaly.load_state(model_dir / "conv1_stats.state.npz",
                                       source="upstream:fashion-mnist:conv1_stats",
                                       method="mahalanobis")
    threshold = json.loads((model_dir / "conv1_stats.threshold.json").read_text())["threshold"]
    session = ort.InferenceSession(str(model_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    squeeze = BitDepth(_build_script().DEMO_BIT_DEPTH)

    def flagged(images):
        images = squeeze.apply(images, TransformContext("t", "image", "FP32")).array
        stats = session.run(["conv1_stats"], {"image": images.astype(np.float32)})[0]
        return model.score(stats) >= threshold

    benign, _ = traffic.load_images()
    adversarial, _, families = traffic.load_adversarial_images()
    assert set(families) == {"fgsm", "pgd"} and len(adversarial) == 2 * len(benign)
    assert flagged(benign).sum() <= 2  # 1 % FPR on training images; 64 unseen test images
    for family in ("fgsm", "pgd"):
        assert flagged(adversarial[families == family]).mean() >= 0.8, family
