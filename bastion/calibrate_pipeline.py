"""`bastion calibrate` without ``--stage``: a model's request stages calibrated together.

Every request stage that acts (it has an ``action`` or a ``threshold_file``) and whose threshold
is not a number in the config gets a threshold; stages with a fixed ``threshold`` keep it, and
what they flag, like the texts a stage refuses (``limit.text``), counts against the budget.
Learners (:class:`~bastion.core.learner.Learner` stages) are fitted first on ``--fit-fraction`` of the texts; the thresholds are
set on the rest, each text run once through the whole pipeline as the sidecar runs it. How the
budget is shared: :mod:`bastion.calibration_budget`. Shadow stages and monitor-mode models are
calibrated as if they acted, so the budget still holds once they are enforced.
"""
from __future__ import annotations

import asyncio
import json
import pathlib
import random
import sys

import numpy as np

from bastion.calibration_steps import (
    default_threshold_file,
    fit_learner,
    read_records,
    run_texts,
    threshold_record,
)
from bastion.calibration_budget import flag_rates, pool_sources, split_budget
from bastion.core.learner import is_learner

WARN_FACTOR = 2.0  # a source over this multiple of the target gets a WARNING line


def _stage_roles(pipeline) -> tuple[list, list]:
    """(stages to calibrate, stages with a fixed threshold that act)."""
    calibrated = [r for r in pipeline.runners if r.config.threshold_source in ("file", "missing")]
    fixed = [r for r in pipeline.runners
             if r.config.threshold_source == "config" and r.config.common.action is not None]
    return calibrated, fixed


def calibrate_pipeline(args, pipeline, input_name: str) -> int:
    calibrated, fixed = _stage_roles(pipeline)
    for runner in pipeline.response_runners:
        if runner.config.threshold_source == "missing":
            print(f"bastion calibrate: response stage {runner.config.stage_id!r} is calibrated "
                  f"on its own: --stage {runner.config.stage_id} --data benign.npz",
                  file=sys.stderr)
    if not calibrated:
        print(f"bastion calibrate: model {args.model!r} has no request stage to calibrate (give "
              "a detector an `action`; it then reads thresholds/MODEL.STAGE.json next to the "
              "config)", file=sys.stderr)
        return 2
    texts, sources = read_records(args.data, args.text_field)
    if args.limit:
        texts, sources = texts[:args.limit], sources[:args.limit]
    if len(texts) < 20:
        print(f"bastion calibrate: only {len(texts)} benign texts in {args.data}", file=sys.stderr)
        return 2

    order = list(range(len(texts)))
    learners = [i for i, r in enumerate(pipeline.runners)
                if is_learner(r.config.impl)]
    fit_note = "none (no stage learns)"
    if learners:
        random.Random(args.seed).shuffle(order)
        cut = int(len(order) * args.fit_fraction)
        fit_rows, order = order[:cut], order[cut:]
        notes = [f"{pipeline.runners[i].config.stage_id} "
                 + fit_learner(pipeline, i, input_name, [texts[j] for j in fit_rows])
                 for i in learners]
        fit_note = "; ".join(notes)
    held_texts = [texts[j] for j in order]
    groups = pool_sources([sources[j] for j in order])

    scores, refused, _ = asyncio.run(run_texts(
        pipeline, input_name, held_texts,
        progress=sys.stderr.isatty() or args.progress))
    fixed_flags = refused != None  # noqa: E711 - elementwise on an object array
    for runner in fixed:
        with np.errstate(invalid="ignore"):
            fixed_flags |= scores[runner.config.stage_id] >= runner.config.common.threshold
    try:
        result = split_budget({r.config.stage_id: scores[r.config.stage_id] for r in calibrated},
                              fixed_flags, args.target_fpr,
                              groups if args.budget == "per-source" else None,
                              source_factor=getattr(args, "source_tolerance", 1.0))
    except ValueError as err:
        print(f"bastion calibrate: {err}", file=sys.stderr)
        return 2

    report = build_report(args, calibrated, fixed, scores, refused, groups, result, fit_note)
    print_report(report)
    if args.report:
        pathlib.Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if not result.met:
        print(f"bastion calibrate: ERROR: the stages with a fixed threshold and refused texts "
              f"alone exceed the target FPR {args.target_fpr:g}; no threshold file written",
              file=sys.stderr)
        return 1
    for runner in calibrated:
        stage_id = runner.config.stage_id
        stage_scores = scores[stage_id]
        record = threshold_record(args, stage_id, result.thresholds[stage_id],
                                  stage_scores[np.isfinite(stage_scores)], fit_note)
        record.update(command=getattr(args, "command_line", None) or command_line(),
                      method=args.method, budget=args.budget,
                      source_tolerance=getattr(args, "source_tolerance", 1.0),
                      pipeline_fpr=report["pipeline_fpr"], exceedance=result.exceedance)
        out = default_threshold_file(args, runner)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {len(calibrated)} threshold file(s); the stages read them where the config "
          "says (threshold_file, else thresholds/MODEL.STAGE.json next to the config)")
    return 0


def command_line() -> str:
    """The command as typed (recorded in every threshold file it writes)."""
    import shlex
    return "bastion " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def build_report(args, calibrated, fixed, scores, refused, groups, result, fit_note) -> dict:
    n = len(result.flagged)
    stages = []
    for role, runners in (("calibrated", calibrated), ("fixed", fixed)):
        for runner in runners:
            stage_id = runner.config.stage_id
            threshold = (result.thresholds[stage_id] if role == "calibrated"
                         else runner.config.common.threshold)
            with np.errstate(invalid="ignore"):
                flagged = int(np.sum(scores[stage_id] >= threshold))
            entry = {"stage": stage_id, "kind": runner.config.kind_name, "role": role,
                     "threshold": threshold, "flagged": flagged, "fpr": flagged / n}
            if role == "calibrated":
                entry["file"] = str(default_threshold_file(args, runner))
            stages.append(entry)
    limit = WARN_FACTOR * args.target_fpr
    per_source = {group: {"rows": rows, "flagged": hits, "fpr": hits / rows,
                          "warning": hits / rows > limit}
                  for group, (hits, rows) in flag_rates(result.flagged, groups).items()}
    refusals = [r for r in refused.tolist() if r is not None]
    return {
        "model": args.model, "config": str(args.config), "data": str(args.data),
        "target_fpr": args.target_fpr, "method": args.method, "budget": args.budget,
        "budget_met": result.met, "exceedance": result.exceedance, "fit": fit_note,
        "calibration_texts": n, "stages": stages,
        "refused": {stage: refusals.count(stage) for stage in sorted(set(refusals))},
        "pipeline_flagged": int(result.flagged.sum()),
        "pipeline_fpr": float(result.flagged.mean()),
        "sources": per_source,
        "warnings": [f"source {name!r}: FPR {s['fpr']:.4f} exceeds {WARN_FACTOR:g}x the target "
                     f"{args.target_fpr:g}" for name, s in per_source.items() if s["warning"]]
        + exit_gate_warnings(calibrated, result.thresholds),
    }


def exit_gate_warnings(calibrated, thresholds: dict[str, float]) -> list[str]:
    """A classifier threshold under its early exit's gate: below the gate a window's score is
    the exit head's, not the full model's, so such a threshold judges by three layers."""
    out = []
    for runner in calibrated:
        encoder = getattr(runner.config.impl, "encoder", None)
        gate = getattr(encoder, "exit_gate", None)
        threshold = thresholds.get(runner.config.stage_id)
        if gate is not None and gate > 0 and threshold is not None and threshold < gate:
            out.append(f"stage {runner.config.stage_id!r}: threshold {threshold:.4g} is below "
                       f"its model's early-exit gate {gate:.4g} (scores under the gate come "
                       "from the exit head); set `early_exit: false` on the stage and "
                       "calibrate again")
    return out


def print_report(report: dict) -> None:
    print(f"model {report['model']!r}: {report['method']} budget ({report['budget']}), target "
          f"FPR {report['target_fpr']:g}, {report['calibration_texts']} benign calibration "
          f"texts, common per-stage level r={report['exceedance']:.4g}")
    width = max(len(s["stage"]) for s in report["stages"])
    for stage in report["stages"]:
        where = f"-> {stage['file']}" if "file" in stage else "(fixed in the config)"
        print(f"  {stage['stage']:<{width}}  threshold {stage['threshold']:<12.6g} own FPR "
              f"{stage['fpr']:.4f} ({stage['flagged']})  {where}")
    for stage, count in report["refused"].items():
        print(f"  {stage:<{width}}  refused {count} text(s)")
    print(f"pipeline FPR {report['pipeline_fpr']:.4f} ({report['pipeline_flagged']}/"
          f"{report['calibration_texts']}) pooled; per benign source:")
    for name, source in report["sources"].items():
        print(f"  {name:<{width}}  {source['fpr']:.4f} ({source['flagged']}/{source['rows']})")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
