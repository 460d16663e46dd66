"""Replay A/B (bastion/replay/ab.py): a candidate defense that loses detections or gains false
positives past the tolerance fails, an equal one passes; offline on two configs and against two
live sidecars."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from bastion.replay import ab
from bastion.replay.command import main as replay_main
from bastion.replay.outcome import Outcome
from tests.harness import Sidecar, Upstream

SAMPLE = pathlib.Path(__file__).resolve().parents[1] / "bastion" / "data" / "text_sample.jsonl"
STRICT = ("models:\n  text-classifier:\n    pipeline:\n"
          "      - sanitize.unicode: {fold_confusables: true}\n"
          "      - detect.signatures: {threshold: %s, action: block}\n")


def _outcomes(detected: list[bool], label: str, family: str, start: int = 0) -> list[Outcome]:
    return [Outcome(f"r{start + i}", label, family, "PERMISSION_DENIED" if hit else "OK",
                    verdict="block" if hit else "allow") for i, hit in enumerate(detected)]


def test_compare_flags_lost_detections_and_new_false_positives():
    attacks = [True] * 40 + [False] * 10
    baseline = _outcomes(attacks, "attack", "jailbreak_template") + \
        _outcomes([False] * 200, "benign", "chat", 50)
    weaker = _outcomes([True] * 30 + [False] * 20, "attack", "jailbreak_template") + \
        _outcomes([False] * 190 + [True] * 10, "benign", "chat", 50)
    report = ab.compare(baseline, weaker, max_regression=0.05, max_fpr_increase=0.01)
    rows = {r["family"]: r for r in report["families"]}
    assert round(rows["jailbreak_template"]["diff"], 9) == -0.2
    assert rows["jailbreak_template"]["regressed"]
    assert rows["jailbreak_template"]["ci_low"] <= -0.2 <= rows["jailbreak_template"]["ci_high"]
    assert round(rows["chat"]["diff"], 9) == 0.05 and rows["chat"]["regressed"]
    assert not report["passed"] and sorted(report["regressions"]) == ["chat", "jailbreak_template"]
    same = ab.compare(baseline, baseline, 0.0, 0.0)
    assert same["passed"] and all(r["diff"] == 0 and r["changed"] == 0 for r in same["families"])


def test_paired_interval_is_narrow_when_few_records_change():
    a = np.ones(1000)
    b = a.copy()
    b[:5] = 0
    low, high = ab.paired_interval(a, b)
    assert -0.015 <= low <= -0.005 <= high <= 0.0


def test_offline_ab_fails_a_weaker_candidate(tmp_path):
    strict, lax = tmp_path / "strict.yaml", tmp_path / "lax.yaml"
    strict.write_text(STRICT % 1)
    lax.write_text(STRICT % 1000)  # the signatures never act
    common = ["--model", "text-classifier", "--data", str(SAMPLE)]
    out = tmp_path / "fails"
    assert replay_main(["--baseline", str(strict), "--candidate", str(lax), *common,
                        "--out", str(out)]) == 3
    report = json.loads((out / "ab-report.json").read_text())
    assert not report["passed"] and "jailbreak_template" in report["regressions"]
    assert "REGRESSION" in (out / "ab-report.md").read_text()
    same = tmp_path / "same"
    assert replay_main(["--baseline", str(strict), "--candidate", str(strict), *common,
                        "--out", str(same)]) == 0
    # A stricter candidate gains detections: that is not a regression.
    assert replay_main(["--baseline", str(lax), "--candidate", str(strict), *common,
                        "--out", str(tmp_path / "better")]) == 0


def test_live_ab_between_two_sidecars(tmp_path):
    upstream = Upstream()
    strict = Sidecar(upstream.address, config=STRICT % 1)
    lax = Sidecar(upstream.address, config=STRICT % 1000)
    try:
        out = tmp_path / "live"
        code = replay_main(["--baseline-target", strict.address, "--candidate-target",
                            lax.address, "--model", "text-classifier", "--data", str(SAMPLE),
                            "--out", str(out)])
        assert code == 3
        report = json.loads((out / "ab-report.json").read_text())
        assert report["run"]["offline"] is False
        rows = {r["family"]: r for r in report["families"]}
        assert rows["jailbreak_template"]["baseline"] > rows["jailbreak_template"]["candidate"]
        assert rows["benign_chat"]["diff"] == 0
    finally:
        strict.stop()
        lax.stop()
        upstream.stop()


def test_the_ci_example_runs_a_valid_replay_command():
    """deploy/ci/defense-check.yml's replay step parses with the replay command's own options."""
    import argparse
    import shlex

    import yaml

    from bastion.replay.command import add_parser
    workflow = yaml.safe_load((pathlib.Path(__file__).resolve().parents[1] / "deploy" / "ci"
                               / "defense-check.yml").read_text())
    step = next(s for s in workflow["jobs"]["replay-ab"]["steps"]
                if "bastion replay" in s.get("run", ""))
    argv = shlex.split(step["run"].replace("$", "").replace('"', ""))
    assert argv[:2] == ["bastion", "replay"]
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv[1:])
    assert args.baseline and args.candidate and args.max_regression == 0.02


def test_simulate_patch_validate_loop(tmp_path, monkeypatch):
    """The threat simulator's loop: attacks that get through the signatures when mutated are
    written out, added to a known-attack library as they are, and the A/B replay of the same
    mutated corpus shows them caught with the benign FPR unchanged."""
    import re

    from bastion.cli import main as cli_main
    from bastion.replay.mutate import DOCUMENT, TEMPLATES
    from tests import test_anomaly
    # The tiny test encoder knows only its word list: give it the sample's words (and the
    # mutators' frames), so different texts get different embeddings, as a real encoder's do.
    words = re.findall(r"\w+|[^\w\s]", " ".join(
        [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()]
        + list(TEMPLATES) + [DOCUMENT]).lower())
    monkeypatch.setattr(test_anomaly, "TINY_WORDS", list(dict.fromkeys(words)))
    encoder = test_anomaly.make_tiny_encoder(tmp_path / "encoder", dim=64, max_length=256)
    base = tmp_path / "base.yaml"
    base.write_text(STRICT % 1)
    missed = tmp_path / "missed.jsonl"
    common = ["--model", "text-classifier", "--data", str(SAMPLE), "--mutate", "template,split"]
    assert replay_main(["--offline", "-c", str(base), *common, "--write-missed", str(missed),
                        "--out", str(tmp_path / "sim"), "--no-plots"]) == 0
    report = json.loads((tmp_path / "sim" / "report.json").read_text())
    evaded = {(r["mutator"], r["family"]): r["evasion_rate"] for r in report["mutations"]}
    assert evaded[("template", "jailbreak_template")] > 0
    rows = [json.loads(line) for line in missed.read_text().splitlines()]
    assert rows and all(r["label"] == "attack" and r["text"] for r in rows)
    assert {r["source"] for r in rows} >= {"bastion replay --mutate template"}

    library = tmp_path / "library.npz"
    assert cli_main(["signatures", "add", str(missed), "--library", str(library), "--encoder",
                     str(encoder)]) == 0
    patched = tmp_path / "patched.yaml"
    patched.write_text(STRICT % 1 + f"      - detect.attack_library: {{encoder: {encoder}, "
                       f"library: {library}, mode: nearest, threshold: 0.9999, "
                       "action: block}\n")
    out = tmp_path / "ab"
    assert replay_main(["--baseline", str(base), "--candidate", str(patched), *common,
                        "--out", str(out)]) == 0
    rows = {r["family"]: r for r in json.loads((out / "ab-report.json").read_text())["families"]}
    assert rows["jailbreak_template"]["diff"] > 0 and rows["prompt_injection"]["diff"] > 0
    assert rows["benign_chat"]["diff"] == 0
