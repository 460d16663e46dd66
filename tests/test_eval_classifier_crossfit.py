"""tools/eval_classifier_crossfit.py: the cross-fitted threshold of each outer fold comes from the
other folds' unseen-group scores only, and the all-folds threshold lands in the threshold file
with the in-source one kept beside it."""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS / "training"))

import eval_classifier_crossfit as crossfit  # noqa: E402
from eval_prompt_guard import text_digest  # noqa: E402

#: group -> (label, family, fold, score its own fold's model gives it, score other models give)
GROUPS = {
    "chat-a": ("benign", "chat", 0, 0.10, 0.05),
    "chat-b": ("benign", "chat", 1, 0.20, 0.05),
    # Unseen, this register looks like an attack (0.97); seen in training, it does not (0.05).
    "tasks": ("benign", "task", 1, 0.97, 0.05),
    "inj-a": ("attack", "prompt_injection", 0, 0.99, 0.99),
    "inj-b": ("attack", "prompt_injection", 1, 0.95, 0.99),
}
N = 60


def _work(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    corpus, work = tmp_path / "corpus", tmp_path / "work"
    scores: dict[int, dict[str, float]] = {0: {}, 1: {}}
    for group, (label, family, fold, own, other) in GROUPS.items():
        rows = [{"text": f"{group} sample text number {i}", "label": label, "family": family,
                 "group": group, "source": "test", "license": "test"} for i in range(N)]
        (corpus / label).mkdir(parents=True, exist_ok=True)
        (corpus / label / f"{group}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
        for k in (0, 1):  # each fold model scores every text (held out or calibration split)
            for i, r in enumerate(rows):
                scores[k][text_digest(r["text"])] = (own if k == fold else other) + i * 1e-4
    for k, known in scores.items():
        (work / f"fold-{k}").mkdir(parents=True)
        np.savez(work / f"fold-{k}" / "scores.npz", digests=np.array(list(known)),
                 scores=np.array(list(known.values())))
    (work / "folds.json").write_text(json.dumps({g: v[2] for g, v in GROUPS.items()}))
    return corpus, work


def test_cross_fitted_thresholds_see_only_other_folds_unseen_groups(tmp_path):
    corpus, work = _work(tmp_path)
    out = tmp_path / "report.json"
    assert crossfit.main(["--corpus", str(corpus), "--work", str(work), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    in_source, cross = report["thresholds"].values()
    # Fold 0 judged with a threshold from fold 1's unseen groups, where the tasks score 0.97:
    # the threshold rises above them, so fold 0's injections at 0.99 stay caught.
    assert cross[0] > 0.97 and cross[0] < 0.99
    # Fold 1's threshold comes from fold 0's chat only (0.10): unseen tasks at 0.97 cross it.
    assert cross[1] < 0.2
    results = report["results"]
    crossfitted = results[next(name for name in results if name.startswith("cross-fitted"))]
    assert crossfitted["benign_groups"]["tasks"] == 1.0
    assert crossfitted["tpr"]["prompt_injection"] == 1.0
    # All folds: the tasks' unseen scores are in the pool, so the threshold clears them.
    assert report["all_folds_threshold"] > 0.97
    assert in_source == [t for t in in_source if t < 0.2]  # calibration split scored 0.05


def test_write_keeps_the_in_source_threshold(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"threshold": 0.5, "method": "split", "command": "bastion ..."}))
    report = {"benign_texts": 10, "target_fpr": 0.01, "source_tolerance": 2.0, "results": {}}
    crossfit.write_threshold(path, 0.9, report, ["--corpus", "C"])
    crossfit.write_threshold(path, 0.95, report, ["--corpus", "C"])  # a rerun replaces it
    data = json.loads(path.read_text())
    assert data["threshold"] == 0.95 and data["method"] == "cross-fitted"
    assert data["in_source"] == {"threshold": 0.5, "method": "split", "command": "bastion ..."}
    assert data["crossfit"]["command"].endswith("--corpus C")


def test_per_kit_tpr_names_the_kit_a_family_loses(tmp_path, capsys):
    corpus, work = _work(tmp_path)
    out = tmp_path / "report.json"
    assert crossfit.main(["--corpus", str(corpus), "--work", str(work), "--json", str(out),
                          "--per-kit"]) == 0
    results = json.loads(out.read_text())["results"]
    crossfitted = results[next(name for name in results if name.startswith("cross-fitted"))]
    # Both kits clear their outer fold's cross-fitted threshold; a fixed 0.97 tells them apart
    # (inj-b scores 0.95-0.956 held out, inj-a 0.99).
    assert crossfitted["attack_groups"] == {"prompt_injection/inj-a": 1.0,
                                            "prompt_injection/inj-b": 1.0}
    assert "| prompt_injection | inj-b | 60 | 1.00 |" in capsys.readouterr().out
    assert crossfit.main(["--corpus", str(corpus), "--work", str(work), "--json", str(out),
                          "--fixed", "0.97"]) == 0
    fixed = json.loads(out.read_text())["results"]["fixed 0.97"]
    assert fixed["attack_groups"] == {"prompt_injection/inj-a": 1.0, "prompt_injection/inj-b": 0.0}
    assert fixed["tpr"]["prompt_injection"] == 0.5
