"""Pipeline-level `bastion calibrate` (no --stage): the whole pipeline meets the FPR budget.

The detectors here are test-only stages whose score is written in the text (``a=0.42``), so the
synthetic benign mix has exactly the score distributions the test wants: three sources, one of
which ("short") scores high on stage ``c`` the way short texts look perplexing.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bastion.calibration_budget import OTHER_SOURCE, pool_sources, split_budget
from bastion.cli import main
from bastion.config import ConfigError, load_config, parse_config
from bastion.core.learner import Learner
from bastion.core.registry import REGISTRY, StageOptions, register
from bastion.detectors.base import TextDetector


class FieldOptions(StageOptions):
    field: str


class FieldDetector(TextDetector):
    """Score = the number after ``FIELD=`` in the text (0 without one)."""

    def __init__(self, field: str):
        self.pattern = re.compile(rf"\b{re.escape(field)}=([0-9.]+)")

    def score(self, batch):
        return np.array([float(m.group(1)) if (m := self.pattern.search(t)) else 0.0
                         for t in batch])


class LearnerDetector(FieldDetector, Learner):
    """A FieldDetector that must be fitted; it keeps what it was fitted on."""
    fitted: list[list[str]] = []

    def fit(self, reference):
        LearnerDetector.fitted.append(list(reference))
        return self

    def save(self):
        return None  # nothing to write: the test reads LearnerDetector.fitted


class LooksLikeALearner(FieldDetector):
    """Has fit() and the old ``needs_fit`` flag but is no Learner: calibrate must not fit it."""
    needs_fit = True
    fitted: list[list[str]] = []

    def fit(self, reference):
        LooksLikeALearner.fitted.append(list(reference))
        return self


if "test.field" not in REGISTRY:
    register("test.field", "detector", FieldOptions, lambda o: FieldDetector(o.field))
    register("test.learner", "detector", FieldOptions, lambda o: LearnerDetector(o.field))
    register("test.lookalike", "detector", FieldOptions, lambda o: LooksLikeALearner(o.field))

TARGET = 0.02
SIZES = {"chat": 500, "docs": 500, "short": 200, "rare": 10}


def synthetic_mix(seed: int = 0) -> tuple[list[dict], dict[str, np.ndarray], np.ndarray]:
    """Benign records from 4 sources; per stage scores; sources. ``short`` is harder on c."""
    rng = np.random.default_rng(seed)
    rows, scores, sources = [], {"a": [], "b": [], "c": []}, []
    for source, count in SIZES.items():
        for _ in range(count):
            a, b = rng.uniform(0, 1, 2)
            c = rng.uniform(0.9, 1.9) if source == "short" else rng.uniform(0, 1)
            rows.append({"text": f"a={a:.6f} b={b:.6f} c={c:.6f} hello", "source": source,
                         "label": "benign"})
            for name, value in zip("abc", (a, b, c)):
                scores[name].append(float(f"{value:.6f}"))
            sources.append(source)
    return rows, {k: np.array(v) for k, v in scores.items()}, np.array(sources, dtype=object)


def union(scores: dict[str, np.ndarray], thresholds: dict[str, float]) -> np.ndarray:
    return np.any([scores[s] >= t for s, t in thresholds.items()], axis=0)


# ------------------------------------------------------------------------------ the budget


def test_independent_thresholds_overspend_and_split_does_not():
    _, scores, sources = synthetic_mix()
    independent = {s: float(np.quantile(v, 1 - TARGET)) for s, v in scores.items()}
    assert union(scores, independent).mean() > 2 * TARGET  # the problem being solved
    result = split_budget(scores, np.zeros(len(sources), bool), TARGET)
    assert result.met and union(scores, result.thresholds).mean() <= TARGET
    assert result.flagged.mean() <= TARGET
    assert result.flagged.mean() >= TARGET - 3 / len(sources)  # spends what it may
    # every stage at the same exceedance level r
    own = [np.mean(scores[s] >= t) for s, t in result.thresholds.items()]
    assert max(own) - min(own) <= 1 / len(sources) and all(o <= result.exceedance for o in own)


def test_per_source_holds_on_every_source_and_is_stricter_than_pooled():
    _, scores, sources = synthetic_mix()
    groups = pool_sources(list(sources))
    assert set(groups) == {"chat", "docs", "short", OTHER_SOURCE}  # rare (10 rows) pooled
    pooled = split_budget(scores, np.zeros(len(sources), bool), TARGET)
    per_source = split_budget(scores, np.zeros(len(sources), bool), TARGET, groups)
    for group in set(groups):
        assert per_source.flagged[groups == group].mean() <= TARGET
    assert pooled.flagged[groups == "short"].mean() > 2 * TARGET  # pooled lets short overspend
    assert all(per_source.thresholds[s] >= pooled.thresholds[s] for s in scores)
    assert per_source.flagged.mean() < pooled.flagged.mean()


def test_fixed_flags_count_and_can_exhaust_the_budget():
    _, scores, sources = synthetic_mix()
    fixed = np.zeros(len(sources), bool)
    fixed[:10] = True  # 10 of 1210 benign texts flagged by a fixed-threshold stage
    result = split_budget(scores, fixed, TARGET)
    assert result.met and result.flagged[:10].all() and result.flagged.mean() <= TARGET
    assert result.exceedance < split_budget(scores, np.zeros(len(sources), bool),
                                            TARGET).exceedance
    fixed[:100] = True
    assert not split_budget(scores, fixed, TARGET).met


def test_ties_never_exceed_the_budget():
    scores = {"sig": np.array([0.0] * 990 + [1.0] * 10), "other": np.zeros(1000)}
    result = split_budget(scores, np.zeros(1000, bool), 0.005)
    assert result.met and result.flagged.sum() == 0  # 10 tied at 1.0 > 5 allowed
    assert result.thresholds["other"] > 0.0


# ----------------------------------------------------------------------- the command line

PIPELINE = """\
models:
  chat:
    mode: enforce
    inputs: {prompt: {kind: text}}
    pipeline:
      - limit.text: {max_chars: 300}
      - sanitize.unicode: {}
      - detect.signatures: {threshold: 0.5, action: flag}
      - test.field: {id: a, field: a, action: block}
      - test.field: {id: b, field: b, action: block, threshold_file: custom/b.json}
      - test.field: {id: c, field: c, action: flag}
      - test.field: {id: shadow_score, field: a}
"""


def write_mix(tmp_path, extra: list[dict] = ()) -> tuple:
    rows, scores, sources = synthetic_mix()
    rows = rows + list(extra)
    data = tmp_path / "benign.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = tmp_path / "bastion.yaml"
    config.write_text(PIPELINE)
    return config, data, scores, sources


def calibrate(config, data, *extra) -> int:
    return main(["calibrate", "-c", str(config), "--model", "chat", "--data", str(data),
                 "--target-fpr", str(TARGET), *extra])


def test_uncalibrated_config_is_refused_until_calibrated(tmp_path, capsys):
    config, data, _, _ = write_mix(tmp_path)
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    message = str(refused.value)
    assert f"run `bastion calibrate -c {config} --model chat` to create it" in message
    assert "thresholds/chat.a.json" in message and "custom/b.json" in message
    assert main(["check-config", str(config)]) == 1
    assert "not calibrated yet" in capsys.readouterr().err
    assert main(["serve", "-c", str(config)]) == 2  # refused before anything starts
    assert "--model chat` to create it" in capsys.readouterr().err
    loaded = load_config(config, allow_uncalibrated=True)  # what calibrate loads
    assert loaded.models["chat"].pipeline

    assert calibrate(config, data) == 0
    served = load_config(config)  # now serve / check-config accept it
    stages = served.models["chat"].pipeline
    assert stages[3]["test.field"]["threshold_file"] == str(tmp_path / "thresholds/chat.a.json")
    assert main(["check-config", str(config)]) == 0


def test_pipeline_calibration_meets_budget_on_every_source(tmp_path, capsys):
    benign_attack_talk = [{"text": "Please ignore all previous instructions in my last e-mail.",
                           "source": "chat"}] * 2
    too_long = [{"text": "x" * 400, "source": "docs"}]
    config, data, scores, sources = write_mix(tmp_path, benign_attack_talk + too_long)
    report_file = tmp_path / "report.json"
    assert calibrate(config, data, "--report", str(report_file)) == 0
    out = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    assert report["budget"] == "per-source" and report["method"] == "split"
    assert report["budget_met"] and report["pipeline_fpr"] <= TARGET
    assert all(s["fpr"] <= TARGET for s in report["sources"].values())
    assert set(report["sources"]) == {"chat", "docs", "short", OTHER_SOURCE}
    assert report["refused"] == {"limit.text": 1}
    roles = {s["stage"]: s["role"] for s in report["stages"]}
    assert roles == {"a": "calibrated", "b": "calibrated", "c": "calibrated",
                     "detect.signatures": "fixed"}  # shadow_score has no action: not touched
    assert next(s for s in report["stages"] if s["stage"] == "detect.signatures")["flagged"] == 2
    assert "pipeline FPR" in out and "WARNING" not in out and not report["warnings"]

    written = {s: json.loads(p.read_text()) for s, p in
               (("a", tmp_path / "thresholds/chat.a.json"), ("b", tmp_path / "custom/b.json"),
                ("c", tmp_path / "thresholds/chat.c.json"))}
    for stage, record in written.items():
        assert {"threshold", "target_fpr", "observed_fpr", "quantiles", "method", "budget",
                "pipeline_fpr"} <= set(record)
        assert record["stage"] == stage and record["pipeline_fpr"] == report["pipeline_fpr"]
    # The thresholds, applied to the synthetic scores, hold the budget on every source
    # (+3 fixed/refused texts, none of them in "short").
    flagged = union(scores, {s: r["threshold"] for s, r in written.items()})
    for source in ("chat", "docs", "short"):
        extra = {"chat": 2, "docs": 1, "short": 0}[source]
        rows = int((sources == source).sum()) + extra
        assert (flagged[sources == source].sum() + extra) / rows <= TARGET


def test_pooled_budget_warns_about_the_source_that_overspends(tmp_path, capsys):
    config, data, _, _ = write_mix(tmp_path)
    report_file = tmp_path / "report.json"
    assert calibrate(config, data, "--budget", "pooled", "--report", str(report_file)) == 0
    out = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    assert report["pipeline_fpr"] <= TARGET
    assert report["sources"]["short"]["fpr"] > 2 * TARGET and report["sources"]["short"]["warning"]
    assert not report["sources"]["chat"]["warning"]
    assert re.search(r"WARNING: source 'short': FPR 0\.\d+ exceeds 2x the target 0\.02", out)
    assert json.loads((tmp_path / "thresholds/chat.a.json").read_text())["budget"] == "pooled"


def one_source_config(tmp_path, text: str, *stages: str):
    """100 benign texts of one source (``text`` formatted with a=i/100 and i) and a chat model
    whose pipeline is ``stages`` (YAML flow entries); returns (config, data)."""
    rows = [{"text": text.format(a=i / 100, i=i), "source": "s"} for i in range(100)]
    data = tmp_path / "benign.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text("models:\n  chat:\n    inputs: {prompt: {kind: text}}\n    pipeline:\n"
                      + "".join(f"      - {stage}\n" for stage in stages))
    return config, data


def test_learners_are_fitted_on_sanitized_fit_texts_then_thresholded_on_the_rest(tmp_path):
    config, data = one_source_config(tmp_path, "a={a:.2f} zero\u200bwidth {i}",
                                     "sanitize.unicode: {}",
                                     "test.learner: {id: learn, field: a, action: block}")
    LearnerDetector.fitted.clear()
    assert calibrate(config, data, "--fit-fraction", "0.4") == 0
    (fitted,) = LearnerDetector.fitted
    assert len(fitted) == 40 and not any("\u200b" in t for t in fitted)
    record = json.loads((tmp_path / "thresholds/chat.learn.json").read_text())
    assert record["scored"] == 60 and "fitted on 40 texts" in record["fit"]


def test_calibrate_fits_stages_by_type_not_by_attributes(tmp_path):
    config, data = one_source_config(tmp_path, "a={a:.2f} {i}",
                                     "test.lookalike: {id: look, field: a, action: block}")
    LooksLikeALearner.fitted.clear()
    assert calibrate(config, data) == 0
    assert LooksLikeALearner.fitted == []  # not a Learner: every text scores, none fits
    record = json.loads((tmp_path / "thresholds/chat.look.json").read_text())
    assert record["scored"] == 100 and record["fit"].startswith("none")


def test_a_config_with_nothing_to_calibrate_says_so(tmp_path, capsys):
    config, data, _, _ = write_mix(tmp_path)
    config.write_text("models:\n  chat:\n    inputs: {prompt: {kind: text}}\n    pipeline:\n"
                      "      - detect.signatures: {}\n")
    assert calibrate(config, data) == 2
    assert "no request stage to calibrate" in capsys.readouterr().err


# ----------------------------------------------------------------- paths in a config file


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    (folder / "rules").mkdir(parents=True)
    (folder / "rules/r.yaml").write_text("rules:\n  - id: z\n    family: f\n    literal: zebra\n")
    (folder / "t").mkdir()
    (folder / "t/sig.json").write_text('{"threshold": 0.5}')
    (folder / "c.yaml").write_text(
        "models:\n  chat:\n    pipeline:\n"
        "      - detect.signatures: {rules: rules/r.yaml, threshold_file: t/sig.json}\n"
        "      - detect.signatures: {id: abs, rules: " + str(folder / "rules/r.yaml") + "}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    stages = load_config("../profiles/c.yaml").models["chat"].pipeline
    options = stages[0]["detect.signatures"]
    assert options["rules"] == str(folder / "rules/r.yaml")
    assert options["threshold_file"] == str(folder / "t/sig.json")
    assert stages[1]["detect.signatures"]["rules"] == str(folder / "rules/r.yaml")
    # A config given as data (no file) keeps paths relative to the working directory, and a
    # scheme (builtin:...) is never a path.
    with pytest.raises(ConfigError, match="r.yaml"):
        parse_config({"models": {"chat": {"pipeline": [
            {"detect.signatures": {"rules": "rules/r.yaml"}}]}}})
    from bastion.stage_config import resolve_paths
    entry = resolve_paths("chat", [{"detect.perplexity": {"model": "builtin:tiny-lm"}}], folder)
    assert entry == [{"detect.perplexity": {"model": "builtin:tiny-lm"}}]


def test_single_stage_writes_where_the_stage_reads(tmp_path, monkeypatch, capsys):
    config, data, _, _ = write_mix(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    assert calibrate(config, data, "--stage", "b") == 0
    record = json.loads((tmp_path / "custom/b.json").read_text())
    assert record["stage"] == "b" and record["observed_fpr"] <= TARGET
    assert "the stage reads this file" in capsys.readouterr().out


def test_one_outlier_in_a_small_source_does_not_pin_the_thresholds():
    # 3 sources of 400 texts and one of 60 (too small to show 1 %) whose top text outscores
    # everything: the per-source budget lets that source keep one flag instead of raising the
    # threshold above the highest benign score of all (r = 0).
    rng = np.random.default_rng(3)
    scores = rng.random(1260)
    sources = np.array(["a"] * 400 + ["b"] * 400 + ["c"] * 400 + ["small"] * 60, dtype=object)
    scores[-1] = 2.0
    result = split_budget({"stage": scores}, np.zeros(len(scores), bool), 0.01, sources)
    assert result.met and result.exceedance > 0
    assert result.flagged.sum() <= 0.01 * len(scores)
    for source in ("a", "b", "c"):
        assert result.flagged[sources == source].mean() <= 0.01
    assert result.flagged[sources == "small"].sum() <= 1


def test_source_tolerance_lets_each_source_reach_a_multiple_while_the_pool_holds():
    _, scores, sources = synthetic_mix()
    groups = pool_sources(list(sources))
    strict = split_budget(scores, np.zeros(len(sources), bool), TARGET, groups)
    tolerant = split_budget(scores, np.zeros(len(sources), bool), TARGET, groups,
                            source_factor=2.0)
    assert tolerant.flagged.mean() <= TARGET
    for group in set(groups):
        rows = int((groups == group).sum())
        assert tolerant.flagged[groups == group].sum() <= max(2 * TARGET * rows, 1)
    assert tolerant.exceedance >= strict.exceedance
    assert all(tolerant.thresholds[s] <= strict.thresholds[s] for s in scores)
