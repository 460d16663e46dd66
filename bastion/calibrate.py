"""`bastion calibrate`: fit a stage's detector on benign data and set its threshold at a target FPR.

    bastion calibrate -c CONFIG --model NAME --data benign.jsonl[.gz] [--target-fpr 0.01] \
        [--budget per-source|pooled] [--report report.json]
    bastion calibrate -c CONFIG --model NAME --stage ID --data benign.jsonl[.gz] \
        [--target-fpr 0.01] [--fit-fraction 0.5] [--out thresholds/NAME.ID.json]

Without ``--stage`` every acting request stage of the model is calibrated together so the whole
pipeline stays within the budget (:mod:`bastion.calibrate_pipeline`); with it, one stage alone
gets the target FPR. A config whose threshold files do not exist yet loads here (the stages are
uncalibrated); `bastion serve` refuses it until they are written.

Records are JSON lines with a text field (default `text`); rows with a `label` other than
`benign` are ignored, so a labelled dev file can be passed as is. The configured pipeline runs
as in the sidecar (sanitizers before the detector), so the threshold matches what production
scores. Stages that learn (a :class:`~bastion.core.learner.Learner`) are fitted on one part of the data and the
threshold is set on the other, and their state is saved where the stage's `state` option says.
The result is a JSON file that the stage's `threshold_file` option reads.

Response stages that score the model's own features (``detect.features``) are calibrated on
benign *inputs* instead: ``--data benign.npz`` holds one array per model input (e.g. ``image``,
[n, ...]) and optionally ``labels`` [n]; each batch goes to the upstream (``--upstream``, default
the config's ``upstream.target``, TLS as configured) asking for the stage's output, the detector
is fitted on part of the answers (class-conditional on ``labels``, or on the upstream's predicted
class without them) and the threshold set on the rest.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import sys

import numpy as np

from bastion.calibrate_pipeline import calibrate_pipeline
from bastion.core.learner import FeatureReference, is_learner
from bastion.calibration_steps import (
    default_threshold_file,
    fit_learner,
    read_texts,
    run_texts,
    threshold_record,
)


def _find_runner(pipeline, stage_id: str, response: bool = False):
    runners = pipeline.response_runners if response else pipeline.runners
    for index, runner in enumerate(runners):
        if runner.config.stage_id == stage_id:
            return index, runner
    every = pipeline.runners + pipeline.response_runners
    known = ", ".join(r.config.stage_id for r in every) or "none"
    raise SystemExit(f"bastion calibrate: model has no stage {stage_id!r} (stages: {known})")


def _is_response_stage(pipeline, stage_id: str) -> bool:
    return any(r.config.stage_id == stage_id for r in pipeline.response_runners)


async def score_texts(pipeline, stage_id: str, input_name: str, texts: list[str],
                      concurrency: int = 32, progress: bool = False) -> np.ndarray:
    """Each text through the model's pipeline as the sidecar runs it; the stage's scores."""
    index, _ = _find_runner(pipeline, stage_id)
    # Stages after this one cannot change its score.
    scores, _, _ = await run_texts(pipeline, input_name, texts, concurrency, progress,
                                   upto=index + 1)
    return scores[stage_id]


def threshold_at_fpr(scores: np.ndarray, target_fpr: float) -> float:
    """The smallest threshold with at most ``target_fpr`` of benign scores at or above it
    (the policy acts on score >= threshold)."""
    from bastion.calibration_budget import threshold_allowing
    return threshold_allowing(scores, int(np.floor(target_fpr * len(scores))))


def text_input(args, model) -> str:
    return args.input or next((n for n, s in model.inputs.items()
                               if s.kind == "text" or s.datatype == "BYTES"), "prompt")


def describe(scores: np.ndarray) -> str:
    quantiles = [0.5, 0.9, 0.95, 0.99, 0.999]
    values = np.quantile(scores, quantiles)
    parts = [f"p{q * 100:g}={v:.4g}" for q, v in zip(quantiles, values)]
    return f"n={len(scores)} min={scores.min():.4g} " + " ".join(parts) + f" max={scores.max():.4g}"


def calibrate(args: argparse.Namespace) -> int:
    from bastion.config import ConfigError, load_config
    from bastion.proxy.pipeline import build_pipeline

    try:
        config = load_config(args.config, allow_uncalibrated=True)  # calibrate writes them
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    model = config.models.get(args.model)
    if model is None:
        print(f"bastion calibrate: {args.config} has no model {args.model!r}", file=sys.stderr)
        return 2
    pipeline = build_pipeline(args.model, model, allow_uncalibrated=True,
                              stages=config.built_stages(args.model))
    if args.stage is None:
        return calibrate_pipeline(args, pipeline, text_input(args, model))
    if _is_response_stage(pipeline, args.stage):
        _, runner = _find_runner(pipeline, args.stage, response=True)
        return calibrate_response_stage(args, config, runner)
    index, runner = _find_runner(pipeline, args.stage)
    input_name = text_input(args, model)
    texts = read_texts(args.data, args.text_field)
    if args.limit:
        texts = texts[:args.limit]
    if len(texts) < 20:
        print(f"bastion calibrate: only {len(texts)} benign texts in {args.data}", file=sys.stderr)
        return 2
    fit_note = "none (the detector does not learn)"
    held_out = texts
    if is_learner(runner.config.impl):
        rng = random.Random(args.seed)
        shuffled = texts[:]
        rng.shuffle(shuffled)
        cut = int(len(shuffled) * args.fit_fraction)
        fit_texts, held_out = shuffled[:cut], shuffled[cut:]
        fit_note = fit_learner(pipeline, index, input_name, fit_texts)
    scores = asyncio.run(score_texts(pipeline, args.stage, input_name, held_out,
                                     progress=sys.stderr.isatty() or args.progress))
    return write_threshold(args, runner, scores, fit_note, "texts")


def write_threshold(args, runner, scores: np.ndarray, fit_note: str, unit: str) -> int:
    """Threshold at the target FPR on held-out benign scores -> the stage's threshold file."""
    scores = scores[np.isfinite(scores)]
    if len(scores) == 0:
        print("bastion calibrate: no finite scores on the held-out data", file=sys.stderr)
        return 2
    threshold = threshold_at_fpr(scores, args.target_fpr)
    result = threshold_record(args, runner.config.stage_id, threshold, scores, fit_note)
    out = pathlib.Path(args.out) if args.out else default_threshold_file(args, runner)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"scores on benign data: {describe(scores)}")
    print(f"threshold {threshold:.6g} at target FPR {args.target_fpr:g} (observed "
          f"{result['observed_fpr']:.4f} on {len(scores)} held-out benign {unit}) -> {out}")
    configured = runner.config.common.threshold_file
    if configured and pathlib.Path(configured).absolute() == out.absolute():
        print("the stage reads this file (its threshold_file)")
    else:
        print(f"use it with:  - {runner.config.kind_name}: {{threshold_file: {out}, ...}}")
    return 0


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """A benign-input .npz: one array per model input (same first dimension), ``labels``."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    labels = arrays.pop("labels", None)
    if not arrays:
        raise SystemExit(f"bastion calibrate: {path} holds no input arrays")
    rows = {len(a) for a in arrays.values()} | ({len(labels)} if labels is not None else set())
    if len(rows) != 1:
        raise SystemExit(f"bastion calibrate: the arrays in {path} differ in length ({sorted(rows)})")
    return arrays, labels


def upstream_outputs(config, model: str, arrays: dict[str, np.ndarray], outputs: list[str],
                     target: str, batch: int) -> dict[str, np.ndarray]:
    """The upstream's answers to ``arrays`` (``batch`` rows per request), ``outputs`` only."""
    import grpc

    from bastion.protos import pb
    from bastion.proxy.tls import channel_credentials
    from bastion.protos import codec

    tls = config.tls.upstream
    options = [("grpc.max_receive_message_length", config.upstream.max_receive_message_bytes),
               ("grpc.max_send_message_length", config.upstream.max_send_message_bytes)]
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    channel = (grpc.secure_channel(target, channel_credentials(tls), options) if tls.active
               else grpc.insecure_channel(target, options))
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    total = len(next(iter(arrays.values())))
    collected: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    try:
        for start in range(0, total, batch):
            request = pb.ModelInferRequest(model_name=model, id=f"calibrate-{start}")
            codec.encode_request(request, {n: a[start:start + batch] for n, a in arrays.items()})
            for name in outputs:
                request.outputs.add(name=name)
            try:
                raw = infer(request.SerializeToString(), timeout=config.upstream.timeout_s)
            except grpc.RpcError as err:
                raise SystemExit(f"bastion calibrate: upstream {target} answered "
                                 f"{err.code().name}: {err.details()}") from None
            answer = codec.decode_response(pb.ModelInferResponse.FromString(raw))
            for name in outputs:
                if name not in answer:
                    raise SystemExit(f"bastion calibrate: the upstream's answer for model "
                                     f"{model!r} has no output {name!r}")
                collected[name].append(answer[name])
    finally:
        channel.close()
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def calibrate_response_stage(args, config, runner) -> int:
    """Fit a feature stage on the upstream's answers to benign inputs; threshold on held-out."""
    stage = runner.config.impl
    if not is_learner(stage):
        print(f"bastion calibrate: stage {args.stage!r} ({runner.config.kind_name}) learns "
              "nothing from benign data; set its threshold in the config", file=sys.stderr)
        return 2
    if not args.data.endswith(".npz"):
        print("bastion calibrate: a response stage is calibrated on benign inputs: --data "
              "must be an .npz with one array per model input", file=sys.stderr)
        return 2
    arrays, labels = read_tensors(args.data)
    if args.limit:
        arrays = {n: a[:args.limit] for n, a in arrays.items()}
        labels = labels[:args.limit] if labels is not None else None
    total = len(next(iter(arrays.values())))
    if total < 20:
        print(f"bastion calibrate: only {total} benign inputs in {args.data}", file=sys.stderr)
        return 2
    target = args.upstream or config.upstream.target
    wanted = stage.wanted(fitting=True)
    answers = upstream_outputs(config, args.model, arrays, wanted, target, args.batch_size)
    features = answers[wanted[0]].reshape(total, -1)
    predicted = (answers[wanted[1]].reshape(total, -1).argmax(axis=1) if len(wanted) > 1
                 else None)
    classes = labels if labels is not None else predicted
    order = np.random.default_rng(args.seed).permutation(total)
    cut = int(total * args.fit_fraction)
    fit_rows, held_rows = order[:cut], order[cut:]
    source = f"upstream:{args.model}:{wanted[0]}"
    stage.fit(FeatureReference(features[fit_rows],
                               classes[fit_rows] if classes is not None else None, source))
    saved = stage.save()
    fit_note = (f"fitted on {len(fit_rows)} inputs' `{wanted[0]}` from {target}"
                + (" (classes: " + ("labels" if labels is not None else "predicted") + ")"
                   if classes is not None and len(wanted) > 1 else "")
                + f", state saved to {saved}")
    print(f"bastion calibrate: {fit_note}", file=sys.stderr)
    scores = stage.score_rows(features[held_rows],
                              predicted[held_rows] if predicted is not None else None)
    return write_threshold(args, runner, scores, fit_note, "inputs")


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "calibrate", help="set thresholds on benign data at a target false-positive rate: the "
        "whole pipeline's (default) or one stage's (--stage)",
        description="Without --stage, every request stage of the model with an action is "
        "calibrated together so that the whole pipeline (a text is a false positive when any "
        "stage acts) meets --target-fpr; each threshold file is written where the stage reads "
        "it. With --stage, that one stage alone gets the target FPR.")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--stage", help="calibrate only this stage (id or name) at the target "
                        "FPR; default: the whole pipeline together")
    parser.add_argument("--data", required=True, help="benign reference .jsonl[.gz] (text), or "
                        ".npz of model inputs (+ labels) for a response stage")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--input", help="the model's text input name (default: from config)")
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--fit-fraction", type=float, default=0.5)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="--stage: threshold file (default: the stage's "
                        "threshold_file, else thresholds/MODEL.STAGE.json next to the config)")
    parser.add_argument("--method", choices=["split"], default="split",
                        help="pipeline: how stages share the budget. split: one common per-stage "
                        "exceedance level, raised until the union of flags meets the target "
                        "(the same decisions as thresholding the max of rank-normalised scores)")
    parser.add_argument("--budget", choices=["per-source", "pooled"], default="per-source",
                        help="pipeline: per-source (default): every benign `source` in the data "
                        "(sources under 50 texts pooled as `other`) must meet the target, because "
                        "thresholds that hold on every known source transfer better to unknown "
                        "ones; pooled: only the FPR over all texts")
    parser.add_argument("--source-tolerance", type=float, default=1.0,
                        help="pipeline, per-source budget: each source may reach this multiple "
                        "of the target (the pooled FPR stays within the target); 1 = every "
                        "source within the target, 2 = the WARNING level")
    parser.add_argument("--report", help="pipeline: also write the report as JSON here")
    parser.add_argument("--progress", action="store_true", help="progress bar even without a TTY")
    parser.add_argument("--upstream", help="response stages: the model server to ask "
                                           "(default: the config's upstream.target)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="response stages: inputs per upstream request")
    parser.set_defaults(func=calibrate)
