"""A report as text: report.md (tables, links to the plots) and the summary printed at the end."""
from __future__ import annotations

import pathlib


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*names: str, left: int = 1) -> list[str]:
    """A table header; the first ``left`` columns are left-aligned, the rest right-aligned."""
    return [_row(*names), "|" + "---|" * left + "---:|" * (len(names) - left)]


def _pairs(mapping: dict, fmt=str) -> str:
    return ", ".join(f"{k}: {fmt(v)}" for k, v in mapping.items())


def render_markdown(report: dict) -> str:
    meta = report["run"]
    overall = report["overall"]
    target = meta["fpr_target"]
    pct = f"{target * 100:g}%"
    lines = ["# Bastion replay report", "", "Reproduce with:", "", "```",
             meta.get("reproduce") or meta["command"], "```", ""]
    if meta.get("reproduce"):
        lines += ["which ran:", "", "```", meta["command"], "```", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]

    where = (f"offline (pipeline in-process, config `{meta['config']}`)" if meta["offline"]
             else f"sidecar at `{meta['target']}`")
    sample = (f", sample of {meta['limit']} with seed {meta['seed']}" if meta.get("limit")
              else "")
    thresholds = ", ".join(f"`{k}` {v:g}" for k, v in report["thresholds"].items()) or "none"
    source = report["threshold_source"] or "nowhere: no --admin or --config"
    rate = f", rate {meta['rate']:g}/s" if meta.get("rate") else ""
    lines += ["| run | |", "|---|---|",
              _row("generated", meta["generated"]),
              _row("through", where),
              _row("model", f"`{meta['model']}`"),
              _row("data", f"`{meta['data']}` ({meta['records']} records{sample})"),
              _row("annotations seen", _pairs(report["annotations"]["modes"])),
              _row("verdicts", _pairs(dict(sorted(report["annotations"]["verdicts"].items())))),
              _row("thresholds", f"{thresholds} (from {source})"),
              _row("duration", f"{meta['duration_s']:.2f} s ({meta['throughput_rps']:.1f} req/s, "
                               f"concurrency {meta['concurrency']}{rate})"),
              ""]
    if report.get("warnings"):
        lines += [*(f"> **Warning:** {w}" for w in report["warnings"]), ""]

    latency_kind = ("the pipeline in-process" if meta["offline"]
                    else "client-side, through the sidecar")
    auroc_note = f" AUROC {overall['auroc_note']}." if overall["auroc_note"] else ""
    lines += ["## Overall", "",
              "A record is *detected* when its verdict is flag, throttle or block (response "
              "annotations) or the call was refused (PERMISSION_DENIED / RESOURCE_EXHAUSTED). "
              "Errors (any other status) are left out of the rates.", "",
              *_header("records", "benign", "attack", "TP", "FN", "FP", "TN", "TPR", "FPR",
                       "AUROC", f"TPR @ {pct} FPR", "errors", "p50 ms", "p99 ms", left=0),
              _row(overall["records"], overall["benign"], overall["attack"], overall["tp"],
                   overall["fn"], overall["fp"], overall["tn"], _fmt(overall["tpr"]),
                   _fmt(overall["fpr"]), _fmt(overall["auroc"]),
                   _fmt(overall["tpr_at_fpr"]["tpr"]), overall["errors"],
                   _ms(overall["latency"]["p50_ms"]), _ms(overall["latency"]["p99_ms"])),
              "", f"Overall score (for AUROC and TPR @ FPR): {overall['score']}.{auroc_note} "
                  f"Latency: {latency_kind}.", ""]
    if overall["benign"] and overall["benign"] * target < 1:
        lines += [f"With {overall['benign']} benign records the smallest non-zero FPR is "
                  f"1/{overall['benign']} = {1 / overall['benign']:.3f}, so \"TPR @ {pct} FPR\" "
                  "means: at the lowest cut that flags no benign record of this corpus.", ""]

    lines += ["## Per family", "",
              f"Attack families: TPR = share detected; AUROC and TPR @ {pct} FPR compare the "
              "family with all benign records (threshold set on benign scores). Benign "
              "families: FPR.", "",
              *_header("family", "label", "records", "detected", "TPR", "FPR", "AUROC",
                       f"TPR @ {pct} FPR", "errors", "p50 ms", "p99 ms", left=2)]
    notes = []
    for family, entry in report["families"].items():
        if entry["auroc"] is None and entry["auroc_note"]:
            notes.append(f"`{family}`: AUROC {entry['auroc_note']}")
        lines.append(_row(f"`{family}`", entry["label"], entry["records"], entry["detected"],
                          _fmt(entry["tpr"]), _fmt(entry["fpr"]), _fmt(entry["auroc"]),
                          _fmt(entry["tpr_at_fpr"]["tpr"]) if entry["attack"] else "n/a",
                          entry["errors"], _ms(entry["latency"]["p50_ms"]),
                          _ms(entry["latency"]["p99_ms"])))
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    lines.append("")

    if report["stages"]:
        lines += ["## Per stage", "",
                  "From the `bastion.score.<stage>` annotations (monitor mode annotates every "
                  "response; enforce mode only non-allow ones). TPR/FPR at the stage's threshold "
                  f"(`score >= threshold`); TPR @ {pct} FPR at the cut set on benign scores "
                  "(`score > cut`).", "",
                  *_header("stage", "threshold", "scored", "TP", "FN", "FP", "TN", "TPR", "FPR",
                           "AUROC", f"TPR @ {pct} FPR (cut)", "mean score benign / attack")]
        stage_notes = []
        for stage, entry in report["stages"].items():
            point = entry["tpr_at_fpr"]
            if entry["auroc"] is None and entry["auroc_note"]:
                stage_notes.append(f"`{stage}`: AUROC {entry['auroc_note']}")
            if entry.get("note"):
                stage_notes.append(f"`{stage}`: {entry['note']}")
            cut = "" if point.get("threshold") is None else f" (> {point['threshold']:g})"
            means = entry["score_mean"]
            lines.append(_row(f"`{stage}`", _fmt(entry["threshold"], 4), entry["scored"],
                              _fmt(entry["tp"]), _fmt(entry["fn"]), _fmt(entry["fp"]),
                              _fmt(entry["tn"]), _fmt(entry["tpr"]), _fmt(entry["fpr"]),
                              _fmt(entry["auroc"]), _fmt(point.get("tpr")) + cut,
                              f"{_fmt(means['benign'])} / {_fmt(means['attack'])}"))
        if stage_notes:
            lines += ["", *(f"- {n}" for n in stage_notes)]
        stage_ids = list(report["stages"])
        lines += ["", "Detection by stage and family (share with `score >= threshold`; "
                  "FPR for benign families):", "",
                  *_header("family", *(f"`{s}`" for s in stage_ids))]
        for family, entry in report["families"].items():
            cells = []
            for stage in stage_ids:
                item = entry["stages"].get(stage) or {}
                value = item.get("tpr") if item.get("tpr") is not None else item.get("fpr")
                cells.append(_fmt(value))
            lines.append(_row(f"`{family}`", *cells))
        lines.append("")

    plots = report.get("plots") or {}
    if plots.get("roc") or plots.get("histograms"):
        lines += ["## Plots", ""]
        if plots.get("roc"):
            lines += ["ROC curves per stage (and overall):", "",
                      f"![ROC curves per stage]({plots['roc']})", ""]
        for stage, filename in plots.get("histograms", {}).items():
            lines += [f"### `{stage}` scores", "",
                      f"![{stage} score histogram, benign vs attack]({filename})", ""]

    lines += ["## Errors", ""]
    if report["errors"]["total"]:
        lines += _header("status", "count", "example detail")
        lines[-1] = "|---|---:|---|"
        for code, item in report["errors"]["by_code"].items():
            lines.append(_row(code, item["count"], item["example"].replace("|", "\\|")))
    else:
        lines.append("None.")
    lines.append("")

    if report["gates"]:
        lines += ["## Gates", "", *_header("gate", "value", "result")]
        lines[-1] = "|---|---:|---|"
        for gate in report["gates"]:
            lines.append(_row(f"`{gate['gate']}`", _fmt(gate["value"], 4),
                              "pass" if gate["ok"] else "FAIL: " + gate["message"]))
        verdict = "All gates met." if report["gates_passed"] else "Some gates unmet."
        lines += ["", f"**{verdict}**", ""]
    if report.get("mutations"):
        from bastion.replay.mutate import render_evasion
        lines += ["## Threat simulator: attacks that got through, per mutator", "",
                  "Each text attack of the corpus was also sent mutated (`--mutate`, "
                  "bastion/replay/mutate.py); `original` is the attack as written.", "",
                  render_evasion(report["mutations"]), ""]
    if report.get("missed_written"):
        missed = report["missed_written"]
        lines += [f"{missed['records']} attacks that got through are in `{missed['path']}` "
                  "(`bastion signatures add` takes it as it is).", ""]
    lines += ["Per-record results (ids, statuses, verdicts, scores; no texts): "
              "[records.jsonl](records.jsonl). Machine-readable: [report.json](report.json).", ""]
    return "\n".join(lines)


def summary_text(report: dict, out: pathlib.Path) -> str:
    overall = report["overall"]
    lines = [f"bastion replay: {report['run']['records']} records in "
             f"{report['run']['duration_s']:.1f}s; TPR {_fmt(overall['tpr'])}, FPR "
             f"{_fmt(overall['fpr'])}, AUROC {_fmt(overall['auroc'])}, errors {overall['errors']}, "
             f"p50 {_ms(overall['latency']['p50_ms'])} ms, "
             f"p99 {_ms(overall['latency']['p99_ms'])} ms"]
    for family, entry in report["families"].items():
        rate = (f"TPR {_fmt(entry['tpr'])}" if entry["label"] == "attack"
                else f"FPR {_fmt(entry['fpr'])}")
        lines.append(f"  {family:<24} {entry['records']:>6} records  {rate}  "
                     f"AUROC {_fmt(entry['auroc'])}")
    for stage, entry in report["stages"].items():
        lines.append(f"  stage {stage:<18} threshold {_fmt(entry['threshold'], 4)}  TPR "
                     f"{_fmt(entry['tpr'])}  FPR {_fmt(entry['fpr'])}  "
                     f"AUROC {_fmt(entry['auroc'])}")
    for gate in report["gates"]:
        result = "pass" if gate["ok"] else f"FAIL ({gate['message']})"
        lines.append(f"  gate {gate['gate']}: {result}")
    for warning in report.get("warnings", []):
        lines.append(f"  warning: {warning}")
    lines.append(f"report: {out / 'report.md'} (and report.json, plots)")
    return "\n".join(lines)
