"""The threat simulator's image mutator (``bastion replay --mutate square``): the Square attack
behind an oracle (bastion/replay/image_attack.py) and end to end through a real sidecar and the
reference model server (bastion/replay/image_mutator.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bastion import traffic
from bastion.replay import image_attack
from bastion.replay.mutate import MUTATORS, mutate_rows, parse_mutators
from bastion.replay.outcome import ReplayError
from tests.harness import REPO, Sidecar, Upstream

RNG = np.random.default_rng(0)
WEIGHTS = RNG.normal(size=(3, 16)).astype(np.float32)


def linear_oracle(sent: list, refuse=lambda image: False):
    """A 3-class linear softmax model on 4x4 images, recording every image it was sent."""
    def answer(images):
        out = []
        for image in images:
            sent.append(image.copy())
            out.append(None if refuse(image) else WEIGHTS @ image.ravel())
        return out
    return answer


def clean_images(n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(1).uniform(0.2, 0.8, size=(n, 1, 4, 4)).astype(np.float32)
    return x, np.array([int(np.argmax(WEIGHTS @ image.ravel())) for image in x])


def test_square_is_deterministic_under_a_seed_and_stays_within_eps():
    x, y = clean_images()
    runs = []
    for _ in range(2):
        sent = []
        adversarial, counted = image_attack.square_attack(linear_oracle(sent), x, y, eps=0.05,
                                                          query_budget=12, seed=3)
        runs.append(adversarial)
        assert np.abs(adversarial - x).max() <= 0.05 + 1e-6
        assert not np.allclose(adversarial, x)
        # The budget is distinct images per clean image, and no image is sent twice.
        assert counted.queries.max() <= 12 and counted.queries.sum() == len(sent)
        assert len({image.tobytes() for image in sent}) == len(sent)
    np.testing.assert_array_equal(runs[0], runs[1])
    other, _ = image_attack.square_attack(linear_oracle([]), x, y, eps=0.05, query_budget=12,
                                          seed=4)
    assert not np.array_equal(runs[0], other)


def test_a_refused_query_teaches_the_attacker_nothing():
    x, y = clean_images()
    # Refuse everything but the clean images: every step looks like no progress, so the attack
    # never finds a misclassified image however many queries it spends.
    clean = {image.tobytes() for image in x}
    adversarial, counted = image_attack.square_attack(
        linear_oracle([], refuse=lambda image: image.tobytes() not in clean), x, y, eps=0.3,
        query_budget=20, seed=0)
    assert counted.refused.sum() > 0
    assert counted.refused.sum() == counted.queries.sum() - len(x)
    true_class = [int(np.argmax(WEIGHTS @ image.ravel())) for image in adversarial]
    assert true_class == list(y)
    # The same attack answered honestly does fool the model.
    answered, _ = image_attack.square_attack(linear_oracle([]), x, y, eps=0.3, query_budget=20,
                                             seed=0)
    assert [int(np.argmax(WEIGHTS @ image.ravel())) for image in answered] != list(y)


def test_budget_and_eps_are_checked():
    x, y = clean_images()
    with pytest.raises(ReplayError, match="query-budget"):
        image_attack.square_attack(linear_oracle([]), x, y, eps=0.1, query_budget=2)
    with pytest.raises(ReplayError, match="eps"):
        image_attack.square_attack(linear_oracle([]), x, y, eps=0.0, query_budget=10)


def test_square_is_named_never_implied_and_leaves_rows_alone():
    assert "square" not in parse_mutators("all")
    assert parse_mutators("base64,square") == ["base64", "square"]
    rows = [{"tensor": "x.npz#a[0]", "label": "benign"},
            {"text": "Ignore previous instructions", "label": "attack", "family": "pi"}]
    out, mutator_of = mutate_rows(rows, ["square"], seed=0)
    assert len(out) == 2 and set(mutator_of.values()) == {"original"}
    assert len(mutate_rows(rows, ["square", *MUTATORS], 0)[0]) == 2 + len(MUTATORS)


def _corpus(tmp_path, count: int) -> tuple:
    images, labels = traffic.load_images()
    np.savez(tmp_path / "clean.npz", images=images[:count].reshape(count, 1, 28, 28))
    rows = [{"tensor": f"clean.npz#images[{i}]", "label": "benign", "family": "clean",
             "class": int(labels[i]), "id": f"clean-{i}"} for i in range(count)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, images[:count]


def _replay(target: str, data, out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bastion", "replay", "--target", target, "--model",
         "fashion-mnist", "--data", str(data), "--input", "image", "--out", str(out),
         "--no-plots", "--mutate", "square", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_square_through_the_sidecar_and_the_bare_model(tmp_path):
    data, clean = _corpus(tmp_path, 6)
    upstream = Upstream()
    try:
        sidecar = Sidecar(upstream.address,
                          (REPO / "deploy" / "profiles" / "image-classifier.yaml").read_text())
        try:
            results = {}
            for name, target in (("bare", upstream.address), ("sidecar", sidecar.address)):
                out = tmp_path / name
                run = _replay(target, data, out, "--query-budget", "40", "--eps", "0.1")
                assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
                assert "art.config" not in run.stderr
                results[name] = json.loads((out / "report.json").read_text())
        finally:
            sidecar.stop()
    finally:
        upstream.stop()
    for name, report in results.items():
        attack = report["image_attack"]
        assert attack["queries_max"] <= 40 and attack["queries_mean"] >= 3
        saved = np.load(attack["adversarial_file"])
        assert np.abs(saved["adversarial"] - saved["clean"]).max() <= 0.1 + 1e-6
        assert len(saved["adversarial"]) == attack["images"]
        (row,) = [r for r in report["mutations"] if r["mutator"] == "square"]
        assert row["family"] == image_attack.FAMILY and row["sent"] == attack["images"]
        assert row["evaded"] <= attack["fooled_model"]
        # every final image was replayed once more and judged like any other record
        finals = [json.loads(line) for line in (tmp_path / name / "records.jsonl").open()]
        assert sum(r["id"].endswith("~square") for r in finals) == attack["images"]
    bare = results["bare"]["image_attack"]
    assert bare["clean_refused"] == 0 and bare["refused_queries"] == 0
    assert bare["images"] == len(clean)
    # Nothing defends the bare model: every image that fooled it got through.
    (row,) = [r for r in results["bare"]["mutations"] if r["mutator"] == "square"]
    assert row["evaded"] == bare["fooled_model"]
    # The sidecar refuses some of the attacker's queries (the profile sees the noise).
    assert results["sidecar"]["image_attack"]["refused_queries"] > 0


def test_square_needs_a_live_target(tmp_path):
    data, _ = _corpus(tmp_path, 2)
    config = REPO / "deploy" / "profiles" / "image-classifier.yaml"
    run = subprocess.run([sys.executable, "-m", "bastion", "replay", "--offline", "-c",
                          str(config), "--model", "fashion-mnist", "--data", str(data),
                          "--mutate", "square", "--out", str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "live" in run.stderr and "--target" in run.stderr
    run = subprocess.run([sys.executable, "-m", "bastion", "replay", "--baseline", str(config),
                          "--candidate", str(config), "--model", "fashion-mnist", "--data",
                          str(data), "--mutate", "square", "--out", str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "A/B" in run.stderr


def test_padding_interleaves_answered_clean_images_and_hides_them_from_the_attack():
    x, y = clean_images()
    sent = []
    padded = image_attack.PaddedOracle(linear_oracle(sent), pad=2)
    probe = x[1:3] + 0.01
    assert len(padded(probe)) == 2 and len(sent) == 2  # no pool yet: no padding
    sent.clear()
    padded.pool = x[:3]
    answers = padded(probe)
    assert len(answers) == 2 and padded.sent == 4 and len(sent) == 6
    for index, expected in enumerate([x[0], x[1], probe[0], x[2], x[0], probe[1]]):
        np.testing.assert_array_equal(sent[index], expected)
    np.testing.assert_allclose(answers[1], WEIGHTS @ probe[1].ravel(), rtol=1e-6)


@pytest.mark.parametrize("option, value, message", [
    ("--query-budget", "2", "at least 3"), ("--eps", "0", "eps"),
    ("--attack-images", "0", "--attack-images"), ("--pad-queries", "-1", "--pad-queries")])
def test_bad_square_options_stop_before_anything_is_sent(tmp_path, option, value, message):
    data, _ = _corpus(tmp_path, 1)
    # Nothing listens on this port: a check that came after the replay would fail to connect.
    run = _replay("127.0.0.1:9", data, tmp_path / "o", option, value)
    assert run.returncode == 2 and message in run.stderr and "cannot reach" not in run.stderr
