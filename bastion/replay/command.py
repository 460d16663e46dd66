"""The `bastion replay` command: its options, and one run from corpus to report files and exit
status."""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import math
import pathlib
import re
import shlex
import sys
import time

import numpy as np

from bastion.replay.gates import GATE_METRICS, evaluate_gates, parse_gates
from bastion.replay.metrics import compute_report
from bastion.replay.mutate import IMAGE_MUTATORS, MUTATORS
from bastion.replay.offline import OfflinePipeline, replay_offline
from bastion.replay.online import replay_online
from bastion.replay.outcome import EXIT_GATES, EXIT_OK, ReplayError
from bastion.replay.plots import write_plots
from bastion.replay.render import render_markdown, summary_text
from bastion.replay.thresholds import (pipeline_of_config, stage_ids, thresholds_from_admin,
                                       thresholds_of_pipeline)


def load_config_or_exit(path: str):
    from bastion.config import ConfigError, load_config
    try:
        return load_config(path)
    except ConfigError as err:
        raise ReplayError(str(err)) from None


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def _clean(value):
    """NaN / inf -> None, so report.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "argv", None)
    if argv is None and len(sys.argv) > 1 and "replay" in sys.argv[1:]:
        argv = sys.argv[sys.argv.index("replay") + 1:]
    if argv is not None:  # report-only options say nothing about what was measured
        kept, skip = [], False
        for item in argv:
            if skip:
                skip = False
                continue
            if item in ("--note", "--reproduce"):
                skip = True
                continue
            if item.startswith(("--note=", "--reproduce=")):
                continue
            kept.append(item)
        argv = kept
    if argv is None:
        argv = []
        for key in ("target", "admin", "config", "model", "data", "input", "concurrency",
                    "rate", "timeout", "out", "fpr", "fail_under", "limit", "seed"):
            value = getattr(args, key, None)
            if value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        if args.offline:
            argv.insert(0, "--offline")
    return "bastion replay " + shlex.join(argv)


def _parse_shape(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(d) for d in re.split(r"[,x\s]+", text.strip("[]() ")) if d]
    except ValueError:
        raise ReplayError(f"bastion replay: --shape: expected numbers like 1,1,28,28, got "
                          f"{text!r}") from None


def _tensor_input_name(args, rows, config) -> str | None:
    """--input, else the model's one declared non-text input (config), else None."""
    from bastion import corpus
    if not corpus.needs_tensor_input(rows):
        return args.input
    if args.input:
        return args.input
    if config is not None and args.model in config.models:
        declared = [n for n, s in config.models[args.model].inputs.items() if s.kind != "text"
                    and s.datatype != "BYTES"]
        if len(declared) == 1:
            return declared[0]
    raise ReplayError("bastion replay: the data has tensor records; name the model input with "
                      "--input")


def _records(args, config, rows: list[dict] | None = None):
    """The corpus's records as requests (``rows``: already read and mutated)."""
    from bastion import corpus
    try:
        if rows is None:
            rows = corpus.select(corpus.read_rows(args.data), args.limit, args.seed)
        return corpus.encode_rows(rows, args.data, args.model,
                                  text_input=args.input or corpus.DEFAULT_TEXT_INPUT,
                                  tensor_input=_tensor_input_name(args, rows, config),
                                  shape=_parse_shape(args.shape))
    except corpus.CorpusError as err:
        raise ReplayError(f"bastion replay: {err}") from None


def _mutated_rows(args) -> tuple[list[dict] | None, dict[str, str]]:
    """With --mutate (or --write-missed, which needs each record's text): the corpus, with each
    text attack's mutated copies (bastion/replay/mutate.py), and row id -> mutator; else
    (None, {}): the rows are read as usual."""
    from bastion import corpus
    from bastion.replay.mutate import mutate_rows, parse_mutators
    if not (getattr(args, "mutate", None) or getattr(args, "write_missed", None)):
        return None, {}
    try:
        names = parse_mutators(args.mutate) if args.mutate else []
        rows = corpus.select(corpus.read_rows(args.data), args.limit, args.seed)
    except (ValueError, corpus.CorpusError) as err:
        raise ReplayError(f"bastion replay: {err}") from None
    return mutate_rows(rows, names, args.seed)


def _image_attack_named(args) -> bool:
    names = [n.strip() for n in (getattr(args, "mutate", None) or "").split(",")]
    return any(n in IMAGE_MUTATORS for n in names)


def _write_missed(path: str, rows: list[dict], outcomes, mutator_of: dict[str, str]) -> int:
    """The text attacks that got through, as JSONL ``bastion signatures add`` takes as it is
    (text, label, family, source naming the mutator); returns how many."""
    text_of = {row["id"]: row["text"] for row in rows if isinstance(row.get("text"), str)}
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        for outcome in outcomes:
            if (outcome.label == "benign" or outcome.error or outcome.detected
                    or outcome.id not in text_of):
                continue
            handle.write(json.dumps({
                "id": outcome.id, "text": text_of[outcome.id], "label": "attack",
                "family": outcome.family,
                "source": f"bastion replay --mutate {mutator_of.get(outcome.id, 'original')}",
            }, ensure_ascii=False) + "\n")
            written += 1
    return written


def run_ab(args: argparse.Namespace) -> int:
    """Replay A/B (bastion/replay/ab.py): the same records through a baseline and a candidate,
    two configs in-process (--baseline/--candidate) or two live sidecars
    (--baseline-target/--candidate-target)."""
    from bastion.replay import ab
    offline = bool(args.baseline or args.candidate)
    if offline and not (args.baseline and args.candidate):
        raise ReplayError("bastion replay: A/B needs both --baseline and --candidate configs")
    if not offline and not (args.baseline_target and args.candidate_target):
        raise ReplayError("bastion replay: A/B needs both --baseline-target and "
                          "--candidate-target (or --baseline and --candidate configs)")
    if args.max_regression < 0 or args.max_fpr_increase < 0:
        raise ReplayError("bastion replay: tolerances must not be negative")
    configs = ([load_config_or_exit(args.baseline), load_config_or_exit(args.candidate)]
               if offline else [None, None])
    if _image_attack_named(args):
        raise ReplayError("bastion replay: --mutate square attacks one live target; run it "
                          "against each side on its own, not in an A/B")
    rows, _ = _mutated_rows(args)  # --mutate: both sides get the same mutated attacks
    records = _records(args, configs[0], rows)
    progress = args.progress or sys.stderr.isatty()
    sides = []
    for name, config, target in (("baseline", configs[0], args.baseline_target),
                                 ("candidate", configs[1], args.candidate_target)):
        if offline:
            sides.append(asyncio.run(replay_offline(records, OfflinePipeline(config, args.model),
                                                    progress)))
        else:
            sides.append(asyncio.run(replay_online(records, target, args.concurrency, args.rate,
                                                   args.timeout, progress)))
    report = ab.compare(sides[0], sides[1], args.max_regression, args.max_fpr_increase)
    names = ((args.baseline, args.candidate) if offline
             else (args.baseline_target, args.candidate_target))
    report["run"] = {"command": _command_line(args), "baseline": names[0],
                     "candidate": names[1], "offline": offline, "model": args.model,
                     "data": str(args.data), "records": len(records)}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab-report.json").write_text(json.dumps(_clean(report), indent=2) + "\n")
    text = ab.render(report, *names)
    (out / "ab-report.md").write_text(f"Command: `{report['run']['command']}`\n\n" + text)
    print(text, end="", flush=True)
    if not report["passed"]:
        print(f"bastion replay: the candidate regresses {', '.join(report['regressions'])}",
              file=sys.stderr)
        return EXIT_GATES
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    if any(getattr(args, key, None) for key in ("baseline", "candidate", "baseline_target",
                                                "candidate_target")):
        return run_ab(args)
    if not 0 <= args.fpr <= 1:
        raise ReplayError("bastion replay: --fpr must be between 0 and 1")
    if args.concurrency < 1:
        raise ReplayError("bastion replay: --concurrency must be at least 1")
    if args.rate is not None and args.rate <= 0:
        raise ReplayError("bastion replay: --rate must be positive")
    gates = parse_gates(args.fail_under)
    if args.offline:
        if not args.config:
            raise ReplayError("bastion replay: --offline needs -c/--config (the pipeline to run)")
    elif not args.target:
        raise ReplayError("bastion replay: --target HOST:PORT is required (or use --offline "
                          "-c CONFIG)")
    image_attack = _image_attack_named(args)
    if image_attack and args.offline:
        raise ReplayError("bastion replay: --mutate square queries the model through a live "
                          "sidecar: use --target (offline mode has no model to answer)")
    if image_attack:
        from bastion.replay.image_mutator import check_options
        check_options(args)
    config = load_config_or_exit(args.config) if args.config else None
    runner = OfflinePipeline(config, args.model) if args.offline else None

    rows, mutator_of = _mutated_rows(args)
    records = _records(args, config, rows)

    # Thresholds for per-stage rates and the plots' vertical lines; stage order for the tables.
    pipeline = runner.pipeline if args.offline else (
        pipeline_of_config(config, args.model) if config is not None else None)
    if args.offline:
        thresholds, source = runner.thresholds(), f"config {args.config}"
    elif args.admin:
        thresholds, source = thresholds_from_admin(args.admin, args.model), \
            f"{args.admin}/metrics"
    elif pipeline is not None:
        thresholds, source = thresholds_of_pipeline(pipeline), f"config {args.config}"
    else:
        thresholds, source = {}, None

    progress = args.progress or sys.stderr.isatty()
    started = time.perf_counter()
    if args.offline:
        outcomes = asyncio.run(replay_offline(records, runner, progress))
    else:
        outcomes = asyncio.run(replay_online(records, args.target, args.concurrency, args.rate,
                                             args.timeout, progress))
    square = None
    if image_attack:  # after the main replay: the attacker's escalation stays its own
        from bastion.replay.image_mutator import run_square
        square = run_square(args, rows, _tensor_input_name(args, rows, config),
                            _parse_shape(args.shape), pathlib.Path(args.out), progress)
        outcomes += square.outcomes
        mutator_of.update(square.mutator_of)
    duration = time.perf_counter() - started

    report, arrays = compute_report(outcomes, thresholds, args.fpr,
                                    stage_ids(pipeline, response=not args.offline))
    if source is not None:  # thresholds were read: a stage without one has none configured
        for entry in report["stages"].values():
            if entry.get("note") and entry["threshold"] is None:
                entry["note"] = "no threshold configured"
    warnings = []
    if args.offline and runner.skipped_stages():
        warnings.append("offline mode runs request stages only; not run (they need the model's "
                        f"answer): {', '.join(runner.skipped_stages())}")
    modes = report["annotations"]["modes"]
    if not args.offline and modes.get("none", 0) == len(outcomes) - report["overall"]["errors"] \
            and len(outcomes) > report["overall"]["errors"]:
        warnings.append(f"no response carried a bastion verdict: is model {args.model!r} "
                        "configured in the sidecar? (enforce mode annotates only non-allow "
                        "verdicts; monitor mode annotates every response with per-stage scores)")
    if not report["stages"] and not args.offline:
        warnings.append("no per-stage scores were seen (they come with monitor mode)")
    errors = collections.defaultdict(lambda: {"count": 0, "example": ""})
    for o in outcomes:
        if o.error:
            errors[o.status]["count"] += 1
            errors[o.status]["example"] = errors[o.status]["example"] or o.detail
    report = {
        "bastion_replay": 1,
        "run": {"command": _command_line(args), "reproduce": args.reproduce, "note": args.note,
                "generated": datetime.datetime.now(datetime.timezone.utc)
                .replace(microsecond=0).isoformat(),
                "offline": bool(args.offline), "target": None if args.offline else args.target,
                "config": args.config, "model": args.model, "data": str(args.data),
                "records": len(records), "limit": args.limit, "seed": args.seed,
                "concurrency": 1 if args.offline else args.concurrency,
                "rate": None if args.offline else args.rate, "timeout_s": args.timeout,
                "fpr_target": args.fpr, "duration_s": duration,
                "throughput_rps": len(records) / duration if duration > 0 else 0.0},
        "thresholds": thresholds, "threshold_source": source, "warnings": warnings,
        **report,
        "errors": {"total": sum(e["count"] for e in errors.values()),
                   "by_code": dict(sorted(errors.items()))},
        "latency_ms": report["overall"]["latency"],
    }
    if args.mutate:
        from bastion.replay.mutate import evasion_table
        report["mutations"] = evasion_table(outcomes, mutator_of,
                                            square.fooled if square else None)
        if square:
            report["image_attack"] = square.summary
    if args.write_missed:
        report["missed_written"] = {"path": args.write_missed, "records": _write_missed(
            args.write_missed, rows, outcomes, mutator_of)}
    gate_results = evaluate_gates(gates, report)
    report["gates"] = gate_results
    report["gates_passed"] = all(g["ok"] for g in gate_results)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = {}
    if not args.no_plots:
        try:
            report["plots"] = write_plots(out, arrays, thresholds, report)
        except ImportError as err:  # matplotlib is optional: the numbers do not need it
            report["warnings"].append(f"no plots: {err.name or err} is not installed "
                                      "(pip install matplotlib)")
    report = _clean(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    with (out / "records.jsonl").open("w") as handle:
        for o in outcomes:
            handle.write(json.dumps(_clean(o.to_json()), default=_json_default) + "\n")

    print(summary_text(report, out), flush=True)
    if report.get("mutations"):
        from bastion.replay.mutate import render_evasion
        print("\nthreat simulator: attacks that got through, per mutator and family\n"
              + render_evasion(report["mutations"]), flush=True)
    if report.get("image_attack"):
        attack = report["image_attack"]
        print(f"square: {attack['images']} images, eps {attack['eps']}, "
              f"{attack['queries_mean']:.1f} queries per image (budget {attack['query_budget']}), "
              f"{attack['refused_queries']} refused, {attack['padding_queries']} padding; "
              f"{attack['fooled_model']} fooled the model; "
              f"adversarial images in {attack['adversarial_file']}", flush=True)
    if report.get("missed_written"):
        missed = report["missed_written"]
        print(f"\n{missed['records']} attacks that got through written to {missed['path']} "
              "(bastion signatures add takes it as it is)", flush=True)
    failed = [g for g in gate_results if not g["ok"]]
    if failed:
        print("bastion replay: gates failed:", file=sys.stderr)
        for gate in failed:
            print(f"  {gate['gate']}: {gate['message']}", file=sys.stderr)
        return EXIT_GATES
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except ReplayError as err:
        print(err, file=sys.stderr)
        return err.code


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "replay", help="replay a labelled corpus through the sidecar; report TPR/FPR/AUROC",
        description="Send a labelled JSONL corpus through a running sidecar (or, with --offline, "
                    "the configured pipeline in-process) and write report.json, report.md and "
                    "plots. Exit 3 when a --fail-under gate is unmet, 2 on bad input.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="gates: METRIC[:FAMILY|STAGE]OP VALUE, space or comma separated; metrics: "
               + ", ".join(GATE_METRICS) + "\n  e.g. --fail-under \"tpr:adv_suffix>=0.99 "
               "fpr<=0.01 auroc:detect.signatures>=0.9 errors<=0\"")
    parser.add_argument("--target", help="sidecar gRPC HOST:PORT")
    parser.add_argument("--model", required=True, help="model name the requests are sent to")
    parser.add_argument("--data", required=True, help="labelled corpus (.jsonl or .jsonl.gz)")
    parser.add_argument("--input", help="input name (default: prompt for text records; for "
                        "tensor records the config's one declared tensor input)")
    parser.add_argument("--shape", help="reshape tensor records, e.g. 1,1,28,28")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    parser.add_argument("--rate", type=float, default=None, help="requests per second (no limit)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, s (10)")
    parser.add_argument("--out", default="replay-report", help="report folder (replay-report)")
    parser.add_argument("--fpr", type=float, default=0.01,
                        help="false positive rate for 'TPR at FPR' (0.01)")
    parser.add_argument("--fail-under", dest="fail_under", metavar="GATES",
                        help="conditions that must hold, e.g. \"tpr:adv_suffix>=0.99 fpr<=0.01\"")
    parser.add_argument("--limit", type=int, default=None, help="replay a random sample of N")
    parser.add_argument("--seed", type=int, default=0, help="seed for --limit's sample (0)")
    parser.add_argument("--admin", help="sidecar admin HOST:PORT: read stage thresholds from "
                        "/metrics")
    parser.add_argument("-c", "--config", help="sidecar config: stage thresholds (online) or "
                        "the pipeline to run (--offline)")
    parser.add_argument("--offline", action="store_true",
                        help="run the model's configured pipeline in-process, no server")
    sim = parser.add_argument_group(
        "threat simulator", "mutate the corpus's text attacks before sending them, or attack its "
        "clean images through the live sidecar (square); report the evasion rate per mutator "
        "and family")
    sim.add_argument("--mutate", metavar="NAMES", help="all (every text mutator), or a comma "
                     "list of: " + ", ".join((*MUTATORS, *IMAGE_MUTATORS)))
    sim.add_argument("--attack-images", type=int, default=20, metavar="N",
                     help="square: attack the first N benign tensor records (20)")
    sim.add_argument("--query-budget", type=int, default=100, metavar="Q",
                     help="square: distinct images sent per clean image, at most (100)")
    sim.add_argument("--eps", type=float, default=0.1,
                     help="square: L-inf radius, in the tensor's units (0.1)")
    sim.add_argument("--pad-queries", type=int, default=0, metavar="K",
                     help="square: before each query send K clean images the defense "
                     "answered (an attacker keeping its refused share low against a client "
                     "tier) (0)")
    sim.add_argument("--attack-output", metavar="NAME", help="square: the output whose scores "
                     "the attacker reads (default: the answer's first output)")
    sim.add_argument("--write-missed", metavar="FILE.jsonl", help="write the attacks that got "
                     "through (mutated ones included) as JSONL for `bastion signatures add`")
    ab = parser.add_argument_group(
        "A/B (a defense change as a patch validator)",
        "the same records through a baseline and a candidate; per family the difference with its "
        "paired-bootstrap interval; exit 3 when a family regresses past a tolerance")
    ab.add_argument("--baseline", metavar="CONFIG", help="baseline config (in-process)")
    ab.add_argument("--candidate", metavar="CONFIG", help="candidate config (in-process)")
    ab.add_argument("--baseline-target", metavar="HOST:PORT", help="baseline live sidecar")
    ab.add_argument("--candidate-target", metavar="HOST:PORT", help="candidate live sidecar")
    ab.add_argument("--max-regression", type=float, default=0.02,
                    help="largest TPR drop of an attack family that passes (0.02)")
    ab.add_argument("--max-fpr-increase", type=float, default=0.005,
                    help="largest FPR rise of a benign family that passes (0.005)")
    parser.add_argument("--progress", action="store_true",
                        help="show the progress bar even when stderr is not a terminal")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--note", help="a line of Markdown put under the command in report.md")
    parser.add_argument("--reproduce", metavar="COMMAND", help="the command report.md shows as "
                        "the way to reproduce it (default: this replay command)")
    parser.set_defaults(func=_cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``bastion replay`` without the rest of the CLI (tests, scripts)."""
    parser = argparse.ArgumentParser(prog="bastion")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "replay":
        argv = ["replay", *argv]
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    return args.func(args)
