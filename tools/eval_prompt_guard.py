#!/usr/bin/env python3
"""Source-held-out evaluation of the text defense (the bundled classifier and the llm-prompt
profile), with the peers scored on the same texts in the same run.

    python3 tools/eval_prompt_guard.py --corpus /work/data/text_corpus --work /tmp/pg-eval \
        [--folds 4] [--epochs 1] [--peers-python /work/peers-venv/bin/python]

Protocol (what it predicts: traffic from sources the model and its thresholds never saw):
- The corpus's source groups are dealt into ``--folds`` folds (each family's and each
  register's groups spread over the folds). For every fold, a classifier is trained on the
  other folds' groups only, and its threshold is calibrated on benign texts of those same
  groups that training did not see (a fixed 15 % split), as ``bastion calibrate`` does:
  the per-source budget (every calibration source at most ``--target-fpr``).
- That fold's held-out groups are then scored: benign FPR per held-out source group at the
  calibrated threshold, attack TPR per family at the calibrated threshold and at 1 % FPR of
  the pooled held-out benign texts, AUROC per family, and the over-defense rate on the hard
  negatives. So every number below is measured on groups left out of training AND calibration.
- The profile rows add the profile's fixed rules (``invisible`` characters and
  ``detect.signatures``), run by the real stages, flagged if any stage flags.
- ``detect.ngram`` (the n-gram model, train_prompt_ngram's recipe, fitted per fold on every
  training row) is scored alone and added to the profile under one split budget: measured,
  not shipped (see the doc's reading).
- Scores are cached by text digest (fold classifiers, peers) or by training set (n-gram), so a
  rerun after the corpus grows scores only what is new; ``--folds-file`` keeps an earlier run's
  fold assignment so its fold models stay held out.
- Peers (jailguard, securevector-guardian-model) score the same held-out texts; they were never
  trained on any of this corpus, so their numbers are held-out by construction. Their thresholds:
  their own defaults (jailguard 0.5, securevector 0.807) and the one that gives 1 % FPR on the pooled held-out benign texts.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pathlib
import random
import subprocess
import sys
import time

import numpy as np

from bastion.options import add_options

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "training"))

from generated_doc import write_generated  # noqa: E402
from train_prompt_guard import (ATTACK_FAMILIES, add_buried_option, add_probe_option,  # noqa: E402
                                calibration_key, predict, read_corpus, train)

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "quality-prompt-guard.md"
#: The group -> fold assignment every documented run since the sixth used (committed so the
#: numbers can be reproduced; groups the corpus gains later are dealt around it).
FOLDS_FILE = pathlib.Path(__file__).resolve().parent / "training" / "folds.json"
CALIBRATION_SHARE = 0.15


def assign_folds(records: list[dict], folds: int, fixed: dict[str, int] | None = None
                 ) -> dict[str, int]:
    """Group -> fold. Groups are dealt per (label, family of most rows) so every fold holds out
    some of each family and register; within a cell, the biggest groups go first. ``fixed``
    (an earlier run's folds.json) keeps its groups where they were, so fold models trained
    then stay valid; groups new since are dealt around them."""
    sizes = collections.Counter(r["group"] for r in records)
    main_family: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in records:
        main_family[r["group"]][(r["label"], r["family"])] += 1
    cells: dict[tuple, list[str]] = collections.defaultdict(list)
    for group, counter in main_family.items():
        cells[counter.most_common(1)[0][0]].append(group)
    assignment, load = {}, [0] * folds
    fixed = {g: f for g, f in (fixed or {}).items() if g in sizes}
    for group, f in fixed.items():
        assignment[group] = f
        load[f] += sizes[group]
    for cell in sorted(cells):
        in_cell = [0] * folds
        for group in cells[cell]:
            if group in fixed:
                in_cell[fixed[group]] += 1
        for group in sorted((g for g in cells[cell] if g not in fixed),
                            key=lambda g: (-sizes[g], g)):
            fold = min(range(folds), key=lambda f: (in_cell[f], load[f], f))
            assignment[group] = fold
            in_cell[fold] += 1
            load[fold] += sizes[group]
    return assignment


def held_out_of(selected: list[int], fold: np.ndarray, *columns) -> list:
    """Each column (a list or an array, one entry per corpus record) cut to the records whose
    group is held out in one of the ``selected`` folds: what ``--only-folds`` scores."""
    keep = np.isin(fold, selected)
    return [column[keep] if isinstance(column, np.ndarray)
            else [item for item, k in zip(column, keep) if k] for column in columns]


class FoldFrame:
    """The corpus as the fold tools see it, one entry per record: its fold (by ``fold_of``,
    group -> fold), whether it is a benign calibration text (the fixed hash split), its label,
    group and family, its text and whether the profile's fixed rules flag it."""

    def __init__(self, records: list[dict], fold_of: dict[str, int]):
        self.records = records
        self.texts = [r["text"] for r in records]
        self.fold = np.array([fold_of[r["group"]] for r in records])
        self.n_folds = int(self.fold.max()) + 1
        self.calib = np.array([r["label"] == "benign"
                               and calibration_key(r["text"]) < CALIBRATION_SHARE
                               for r in records])
        self.attack = np.array([r["label"] != "benign" for r in records])
        self.groups = np.array([r["group"] for r in records])
        self.family = np.array([r["family"] for r in records])
        rules = rule_scores(self.texts)
        self.rule_flags = ((rules["signatures"] >= SIGNATURE_THRESHOLD)
                           | (rules["invisible"] >= INVISIBLE_THRESHOLD))

    @classmethod
    def load(cls, corpus: pathlib.Path, folds_file: pathlib.Path, folds: int = 4) -> "FoldFrame":
        records = read_corpus(corpus)
        return cls(records, assign_folds(records, folds, json.loads(folds_file.read_text())))


def calibrated_threshold(scores: dict[str, np.ndarray], fixed_flags: np.ndarray,
                         groups: list[str], target: float) -> dict[str, float]:
    """The stages' thresholds as `bastion calibrate` sets them: the split budget with the
    per-source rule (every calibration source group within ``target``), the fixed rule stages'
    flags counting against it."""
    from bastion.calibration_budget import pool_sources, split_budget
    if not len(fixed_flags):
        raise SystemExit("no benign calibration texts outside the held-out fold")
    return split_budget(scores, fixed_flags, target, pool_sources(groups)).thresholds


def fused_rank(stages: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One ranking score for several stages that share a split budget: the largest per-stage
    rank among the calibration scores (thresholding it is the split budget's decision: every
    stage at the same level). Above every calibration score, the stage's own score (in [0, 1])
    breaks the tie, scaled so it never reorders ranks."""
    best = None
    for calibration, scores in stages.values():
        ordered = np.sort(calibration)
        rank = np.searchsorted(ordered, scores, side="left") / len(ordered)
        rank = rank + 1e-6 * np.clip(scores, 0.0, 1.0)
        best = rank if best is None else np.maximum(best, rank)
    return best


def text_digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def fold_ngram_scores(train_rows: list[dict], texts: list[str], work: pathlib.Path, k: int
                      ) -> np.ndarray:
    """A fold's n-gram model (train_prompt_ngram's recipe) scoring ``texts``; cached under a
    digest of its training texts, so a changed corpus refits (a minute)."""
    key = hashlib.sha1("\n".join(sorted(r["text"] for r in train_rows)).encode()).hexdigest()
    cache = work / f"ngram-{k}-{key[:12]}.npz"
    wanted = [text_digest(t) for t in texts]
    if cache.exists():
        with np.load(cache) as data:
            known = dict(zip(data["digests"].tolist(), data["scores"].tolist()))
        if all(d in known for d in wanted):
            return np.array([known[d] for d in wanted])
    from train_prompt_ngram import fit
    values = fit(train_rows).predict_proba(texts)[:, 1]
    np.savez(cache, digests=np.array(wanted), scores=values)
    return values


def fold_classifier_scores(model_dir: pathlib.Path, texts: list[str], args) -> np.ndarray:
    """A fold classifier's attack probability of ``texts``; cached beside the model by text
    digest, so a grown corpus scores only its new texts."""
    cache = model_dir / "scores.npz"
    known: dict[str, float] = {}
    if cache.exists():
        with np.load(cache) as data:
            known = dict(zip(data["digests"].tolist(), data["scores"].tolist()))
    wanted = [text_digest(t) for t in texts]
    missing = sorted({d: t for d, t in zip(wanted, texts) if d not in known}.items())
    if missing:
        probs = predict(model_dir, [t for _, t in missing], args.max_length, args.max_chunks,
                        threads=args.threads)
        known.update(zip([d for d, _ in missing], (1.0 - probs[:, 0]).tolist()))
        np.savez(cache, digests=np.array(list(known)), scores=np.array(list(known.values())))
    return np.array([known[d] for d in wanted])


def auroc(benign: np.ndarray, attack: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    if not len(benign) or not len(attack):
        return float("nan")
    y = np.r_[np.zeros(len(benign)), np.ones(len(attack))]
    return float(roc_auc_score(y, np.r_[benign, attack]))


def threshold_at_fpr(benign: np.ndarray, fpr: float) -> float:
    part = np.sort(benign)[::-1]
    return float(np.nextafter(part[min(int(np.floor(fpr * len(part))), len(part) - 1)], np.inf))


# -- fixed rules of the profile -------------------------------------------------------------------

def rule_scores(texts: list[str]) -> dict[str, np.ndarray]:
    """Scores of the profile's rule stages, run by the real stage code."""
    from bastion.stage_catalog import registry
    stages = registry()
    invisible = stages["sanitize.unicode"].build(stages["sanitize.unicode"].options(
        nfkc=False, strip_invisible=True, fold_confusables=False, strip_control=False))
    folding = stages["sanitize.unicode"].build(stages["sanitize.unicode"].options(
        fold_confusables=True))
    signatures = stages["detect.signatures"].build(stages["detect.signatures"].options())
    inv, sig = np.zeros(len(texts)), np.zeros(len(texts))
    for i, text in enumerate(texts):
        stripped, counts = invisible.apply_text(text)
        inv[i] = sum(counts.values())
        folded, _ = folding.apply_text(stripped)
        sig[i] = float(signatures.score([folded])[0])
    return {"invisible": inv, "signatures": sig}


def perplexity_scores(texts: list[str], work: pathlib.Path) -> np.ndarray:
    """detect.perplexity (windowed, the bundled tiny LM), run by the real stage; cached."""
    cache = work / "perplexity.npy"
    if cache.exists():
        values = np.load(cache)
        if len(values) == len(texts):
            return values
    from bastion.stage_catalog import registry
    spec = registry()["detect.perplexity"]
    detector = spec.build(spec.options())
    values = np.concatenate([detector.score(texts[i:i + 64]) for i in range(0, len(texts), 64)])
    np.save(cache, values)
    return values


def stratified_sample(records: list[dict], per_cell: int, seed: int = 7) -> np.ndarray:
    """Indices of at most ``per_cell`` records per (label, group), seeded."""
    cells: dict[tuple, list[int]] = collections.defaultdict(list)
    for index, record in enumerate(records):
        cells[(record["label"], record["group"])].append(index)
    rng = random.Random(seed)
    chosen = []
    for key in sorted(cells):
        members = cells[key]
        chosen += members if len(members) <= per_cell else rng.sample(members, per_cell)
    return np.array(sorted(chosen))


# -- peers ------------------------------------------------------------------------------------

def peer_scores(texts: list[str], python: str, work: pathlib.Path) -> dict[str, np.ndarray]:
    """The peers' scores of ``texts`` (tools/peers/score_peers.py in their own venv), cached by
    text digest in WORK/peers-cache.jsonl: a grown sample scores only its new texts."""
    cache = work / "peers-cache.jsonl"
    known: dict[str, dict] = {}
    if cache.exists():
        for line in open(cache):
            row = json.loads(line)
            known[row["digest"]] = row
    missing = sorted({text_digest(t): t for t in texts if text_digest(t) not in known}.items())
    if missing:
        source, scored = work / "peer-input.jsonl", work / "peers.jsonl"
        with open(source, "w") as handle:
            for _, text in missing:
                handle.write(json.dumps({"text": text}) + "\n")
        script = pathlib.Path(__file__).resolve().parent / "peers" / "score_peers.py"
        subprocess.run([python, str(script), "--data", str(source), "--out", str(scored)],
                       check=True)
        with open(cache, "a") as handle:
            for (digest, _), line in zip(missing, open(scored)):
                row = dict(json.loads(line), digest=digest)
                known[digest] = row
                handle.write(json.dumps(row) + "\n")
    names = sorted(PEER_THRESHOLDS)
    return {name: np.array([float(known[text_digest(t)].get(name, np.nan)) for t in texts])
            for name in names}


# -- report -----------------------------------------------------------------------------------

def fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def evaluate(records, flagged: np.ndarray, score: np.ndarray, heldout_benign: np.ndarray,
             target: float) -> dict:
    """Per family TPR (flagged), TPR at `target` FPR of the pooled held-out benign, AUROC."""
    labels = np.array([r["label"] for r in records])
    families = np.array([r["family"] for r in records])
    benign = labels == "benign"
    at_fpr = threshold_at_fpr(score[benign & heldout_benign], target)
    out = {"families": {}, "benign": {}}
    for family in ATTACK_FAMILIES:
        mask = (labels == "attack") & (families == family)
        if mask.any():
            out["families"][family] = {
                "n": int(mask.sum()), "tpr": float(flagged[mask].mean()),
                "tpr_at_fpr": float((score[mask] >= at_fpr).mean()),
                "auroc": auroc(score[benign], score[mask])}
    groups = np.array([r["group"] for r in records])
    for group in sorted(set(groups[benign])):
        mask = benign & (groups == group)
        out["benign"][group] = {"n": int(mask.sum()), "fpr": float(flagged[mask].mean()),
                                "register": str(families[mask][0])}
    out["pooled_fpr"] = float(flagged[benign].mean())
    hard = benign & (families == "hard_negative")
    out["hard_negative_fpr"] = float(flagged[hard].mean()) if hard.any() else float("nan")
    attack = labels == "attack"
    out["pooled_tpr"] = float(flagged[attack].mean())
    return out


def render(results: dict, args, counts: dict, elapsed: float, command: bool = True) -> str:
    lines = []
    if command:
        flags = (f"--folds {args.folds} --epochs {args.epochs} --layers {args.layers} "
                 f"--limit {args.limit} --target-fpr {args.target_fpr} "
                 f"--sample-per-group {args.sample_per_group}"
                 f"{' --buried ' + str(args.buried) if args.buried else ''}"
                 f"{' --probe-epochs ' + str(args.probe_epochs) if args.probe_epochs else ''}"
                 f"{' --teacher-work TEACHERS' if args.teacher_work else ''}"
                 f"{' --perplexity' if args.perplexity else ''}"
                 f"{' --peers-python PY' if args.peers_python else ''}"
                 f"{' --new-folds' if args.new_folds else ''}"
                 f"{' --folds-file FOLDS' if args.folds_file != FOLDS_FILE else ''}"
                 f"{' --only-folds ' + args.only_folds if args.only_folds else ''}")
        lines += [f"Command: `python3 tools/eval_prompt_guard.py --corpus CORPUS {flags}` "
                  f"({elapsed / 60:.0f} min on this machine; corpus: {counts['attack']} attack "
                  f"and {counts['benign']} benign texts in {counts['groups']} source groups).",
                  ""]
    systems = list(results)
    lines += ["### Attack families (held-out groups only)", "",
              "TPR at the calibrated threshold / TPR at 1 % FPR of the pooled held-out benign / "
              "AUROC.", "",
              "| family | n | " + " | ".join(systems) + " |",
              "|---|---:|" + "---|" * len(systems)]
    for family in ATTACK_FAMILIES:
        cells = []
        n = 0
        for system in systems:
            row = results[system]["families"].get(family)
            if row is None:
                cells.append("-")
                continue
            n = row["n"]
            cells.append(f"{fmt(row['tpr'])} / {fmt(row['tpr_at_fpr'])} / {fmt(row['auroc'])}")
        lines.append(f"| {family} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "### Benign FPR per held-out source group (at the calibrated threshold)", "",
              "| group | register | n | " + " | ".join(systems) + " |",
              "|---|---|---:|" + "---:|" * len(systems)]
    first = results[systems[0]]["benign"]
    for group, row in first.items():
        cells = [fmt(results[s]["benign"][group]["fpr"]) for s in systems]
        lines.append(f"| {group} | {row['register']} | {row['n']} | " + " | ".join(cells) + " |")
    lines.append("| **pooled** | | | " + " | ".join(
        fmt(results[s]["pooled_fpr"]) for s in systems) + " |")
    lines.append("| hard negatives (over-defense) | | | " + " | ".join(
        fmt(results[s]["hard_negative_fpr"]) for s in systems) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, corpus=pathlib.Path("/work/data/text_corpus"),
                work=pathlib.Path("/tmp/pg-eval"), folds=4, epochs=1.0, layers=3, max_length=128,
                max_chunks=8, target_fpr=0.01)
    parser.add_argument("--limit", type=int, default=0, help="cap training texts per fold")
    parser.add_argument("--teacher-work", type=pathlib.Path, default=None,
                        help="distil each fold's model from TEACHER_WORK/fold-K (an earlier "
                             "run's deeper fold model, trained without that fold's groups)")
    add_buried_option(parser)
    add_probe_option(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-per-group", type=int, default=60)
    parser.add_argument("--perplexity", action="store_true",
                        help="also score the profile plus detect.perplexity (does it add?)")
    parser.add_argument("--peers-python", default="")
    parser.add_argument("--doc", type=pathlib.Path, default=DOC)
    parser.add_argument("--only-folds", default="",
                        help="comma-separated folds to train and score (default: all); the "
                             "tables then cover those folds' held-out groups only")
    parser.add_argument("--folds-file", type=pathlib.Path, default=FOLDS_FILE,
                        help="keep an earlier run's group -> fold assignment (its folds.json), "
                             "so fold models trained then stay held out; new groups are dealt "
                             "(default: the committed tools/training/folds.json)")
    parser.add_argument("--new-folds", action="store_true",
                        help="deal every group afresh instead of keeping --folds-file's")
    args = parser.parse_args(argv)
    selected = ([int(k) for k in args.only_folds.split(",")] if args.only_folds
                else list(range(args.folds)))
    if args.only_folds and args.perplexity:
        parser.error("--perplexity needs every fold (leave out --only-folds)")
    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)

    records = read_corpus(args.corpus)
    corpus_counts = collections.Counter(r["label"] for r in records)
    texts = [r["text"] for r in records]
    fixed = None if args.new_folds else json.loads(args.folds_file.read_text())
    fold_of_group = assign_folds(records, args.folds, fixed)
    frame = FoldFrame(records, fold_of_group)
    fold, calib, rule_flags = frame.fold, frame.calib, frame.rule_flags
    (args.work / "folds.json").write_text(json.dumps(fold_of_group, indent=1, sort_keys=True))

    clf = np.full(len(records), np.nan)
    ngram = np.full(len(records), np.nan)
    clf_threshold = np.zeros(len(records))
    ngram_threshold = np.zeros(len(records))
    # The profile as shipped (classifier + rules) and the profile with detect.ngram added (one
    # split budget for both models; measured, not shipped): flags and a fused ranking score.
    profile_flag = np.zeros(len(records), dtype=bool)
    with_ngram_flag = np.zeros(len(records), dtype=bool)
    with_ngram_score = np.zeros(len(records))
    # Each fold model's scores of the calibration texts (the other folds' benign split).
    cal_scores_all = {stage: np.full((len(records), args.folds), np.nan)
                      for stage in ("classifier", "ngram")}
    for k in selected:
        model_dir = args.work / f"fold-{k}"
        train_rows = [r for r, f, c in zip(records, fold, calib) if f != k and not c]
        score_index = np.where((fold == k) | ((fold != k) & calib))[0]
        # The n-gram model trains on every training row (it takes a minute, not hours).
        ngram_probs = fold_ngram_scores(train_rows, [texts[i] for i in score_index],
                                        args.work, k)
        if not (model_dir / "config.json").exists():
            if args.limit and len(train_rows) > args.limit:
                train_rows = random.Random(k).sample(train_rows, args.limit)
            train(train_rows, model_dir, args.layers, args.epochs, 32, 8e-5, args.max_length,
                  1.5, 1234 + k, args.threads, buried=args.buried, probe=args.probe_epochs,
                  teacher=args.teacher_work / f"fold-{k}" if args.teacher_work else None)
        clf_probs = fold_classifier_scores(model_dir, [texts[i] for i in score_index], args)
        held_in_index = fold[score_index] == k
        clf[score_index[held_in_index]] = clf_probs[held_in_index]
        ngram[score_index[held_in_index]] = ngram_probs[held_in_index]
        cal_index = score_index[~held_in_index]
        cal_clf, cal_ngram = clf_probs[~held_in_index], ngram_probs[~held_in_index]
        cal_groups = [records[i]["group"] for i in cal_index]
        none = np.zeros(len(cal_index), dtype=bool)
        t = calibrated_threshold({"classifier": cal_clf}, none, cal_groups, args.target_fpr)
        tn = calibrated_threshold({"ngram": cal_ngram}, none, cal_groups, args.target_fpr)
        tp = calibrated_threshold({"classifier": cal_clf}, rule_flags[cal_index], cal_groups,
                                  args.target_fpr)
        joint = calibrated_threshold({"classifier": cal_clf, "ngram": cal_ngram},
                                     rule_flags[cal_index], cal_groups, args.target_fpr)
        cal_scores_all["classifier"][cal_index, k] = cal_clf
        cal_scores_all["ngram"][cal_index, k] = cal_ngram
        held = fold == k
        clf_threshold[held] = t["classifier"]
        ngram_threshold[held] = tn["ngram"]
        profile_flag[held] = (clf[held] >= tp["classifier"]) | rule_flags[held]
        with_ngram_flag[held] = ((clf[held] >= joint["classifier"])
                                 | (ngram[held] >= joint["ngram"]) | rule_flags[held])
        with_ngram_score[held] = np.maximum(
            fused_rank({"classifier": (cal_clf, clf[held]), "ngram": (cal_ngram, ngram[held])}),
            rule_flags[held].astype(float))
        print(f"fold {k}: classifier {t['classifier']:.4f} alone; n-gram {tn['ngram']:.4f} "
              f"alone; profile {tp['classifier']:.4f}; profile + n-gram: classifier "
              f"{joint['classifier']:.4f}, n-gram {joint['ngram']:.4f}; {held.sum()} held-out "
              "texts", file=sys.stderr)

    if len(selected) < args.folds:  # score and report the selected folds' held-out texts only
        (records, texts, clf, ngram, clf_threshold, ngram_threshold, profile_flag,
         with_ngram_flag, with_ngram_score, rule_flags) = held_out_of(
            selected, fold, records, texts, clf, ngram, clf_threshold, ngram_threshold,
            profile_flag, with_ngram_flag, with_ngram_score, rule_flags)
    held_benign = np.array([r["label"] == "benign" for r in records])
    profile_score = np.maximum(clf, rule_flags.astype(float))
    results = {"classifier": evaluate(records, clf >= clf_threshold, clf, held_benign,
                                      args.target_fpr),
               "llm-prompt profile": evaluate(records, profile_flag, profile_score, held_benign,
                                              args.target_fpr),
               "detect.ngram alone": evaluate(records, ngram >= ngram_threshold, ngram,
                                              held_benign, args.target_fpr),
               "profile + detect.ngram": evaluate(records, with_ngram_flag, with_ngram_score,
                                                  held_benign, args.target_fpr)}

    # Side by side on a stratified sample (the peers cost up to 65 ms of CPU a prompt).
    sample = stratified_sample(records, args.sample_per_group)
    sub = [records[i] for i in sample]
    side = {"llm-prompt profile": evaluate(sub, profile_flag[sample], profile_score[sample],
                                           held_benign[sample], args.target_fpr)}
    if args.perplexity:
        ppl = np.full(len(records), np.nan)
        scored = np.union1d(sample, np.where(calib)[0][::4])
        ppl[scored] = perplexity_scores([texts[i] for i in scored], args.work)
        flag = np.zeros(len(records), dtype=bool)
        from bastion.calibration_budget import pool_sources, split_budget
        for k in range(args.folds):
            cal = np.where(calib & (fold != k) & np.isfinite(ppl))[0]
            joint = split_budget({"classifier": cal_scores_all["classifier"][cal, k],
                                  "perplexity": ppl[cal]},
                                 rule_flags[cal], args.target_fpr,
                                 pool_sources([records[i]["group"] for i in cal]))
            held = fold == k
            flag[held] = ((clf[held] >= joint.thresholds["classifier"])
                          | (ppl[held] >= joint.thresholds["perplexity"]) | rule_flags[held])
        side["profile + perplexity"] = evaluate(sub, flag[sample], profile_score[sample],
                                                held_benign[sample], args.target_fpr)
    if args.peers_python:
        for name, score in peer_scores([texts[i] for i in sample], args.peers_python,
                                       args.work).items():
            threshold = PEER_THRESHOLDS[name]
            side[f"{name} ({threshold})"] = evaluate(sub, score >= threshold, score,
                                                     held_benign[sample], args.target_fpr)
    results = {"all held-out texts": results, "side by side (sample)": side}
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    counts = corpus_counts
    counts["groups"] = len(fold_of_group)
    elapsed = time.time() - started
    block = "\n\n".join([
        render(results["all held-out texts"], args, counts, elapsed),
        f"## Side by side with the peers (stratified sample: at most {args.sample_per_group} "
        "texts per source group and label, the same texts for every system)",
        render(results["side by side (sample)"], args, counts, elapsed, command=False)])
    write_generated(args.doc, block, "Text defense quality: source-held-out evaluation")
    print(block)
    return 0


#: The peers' own decision thresholds (jailguard: label = score > 0.5; securevector-guardian's
#: analyze() flags at 0.807, see tools/peers/README.md).
PEER_THRESHOLDS = {"jailguard": 0.5, "securevector": 0.807}
#: Invisible characters (tags, zero-width, variation selectors, bidi controls) one prompt may
#: carry before the profile blocks it (an emoji ZWJ sequence or a flag uses a few).
INVISIBLE_THRESHOLD = 8
#: detect.signatures' threshold in the profile (a rule's weight; 1 = a full match).
SIGNATURE_THRESHOLD = 1.0

if __name__ == "__main__":
    sys.exit(main())
