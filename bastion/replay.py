"""`bastion replay`: send a labelled corpus through a sidecar (or its pipeline, in-process) and
report how well the defenses separate attack from benign traffic; usable as a CI gate.

Online (a running sidecar)::

    bastion replay --target 127.0.0.1:8001 --model text-classifier --data prompts.jsonl \\
        [--admin 127.0.0.1:8002 | --config bastion.yaml] [--concurrency 8] [--rate 50] \\
        [--timeout 10] [--out replay-report] [--fpr 0.01] [--limit N --seed S] \\
        [--fail-under "tpr:adv_suffix>=0.99 fpr<=0.01 errors<=0"]

Offline (the model's configured pipeline run in-process: same stages, same policy, no server)::

    bastion replay --offline -c bastion.yaml --model text-classifier --data prompts.jsonl

A record counts as *detected* when the sidecar's verdict is flag, throttle or block (the
response annotations of monitor mode, or of enforce mode for non-allow verdicts), or when the
call was refused with PERMISSION_DENIED / RESOURCE_EXHAUSTED (enforce mode). Any other failure
(INVALID_ARGUMENT, UNAVAILABLE, DEADLINE_EXCEEDED, ...) is an *error*: counted by status code
and left out of the detection rates. Per-stage numbers come from the ``bastion.score.<stage>``
annotations, so they need monitor mode (enforce mode annotates only non-allow responses).

Outputs in ``--out``: report.json (machine), report.md (tables, links to the plots),
roc.png and hist-<stage>.png (matplotlib), records.jsonl (one line per record: id, family,
status, verdict, scores; never the text).

Exit status: 0 all gates met, 3 a gate is unmet, 2 bad usage / data / config / gate, 1 the
replay could not run (target unreachable).

Top-level imports stay light: ``bastion serve`` imports this module to build its command line.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import json
import math
import pathlib
import re
import shlex
import sys
import time

import grpc
import numpy as np

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_GATES = 0, 1, 2, 3
DETECTED_VERDICTS = frozenset({"flag", "throttle", "block"})
REFUSAL_CODES = frozenset({"PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})
SCORE_PREFIX = "bastion.score."
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ReplayError(Exception):
    """Ends the command with ``code`` and a one-line message."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Outcome:
    """What happened to one record."""
    id: str
    label: str
    family: str
    status: str                     # OK or a gRPC status code name
    verdict: str | None = None      # allow | transform | flag | throttle | block (None: no word)
    mode: str | None = None         # monitor | enforce (from the annotation)
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    reasons: list[str] = dataclasses.field(default_factory=list)
    latency_ms: float = 0.0
    detail: str = ""                # status details of an error (never tensor data)

    @property
    def error(self) -> bool:
        return self.status != "OK" and self.status not in REFUSAL_CODES

    @property
    def detected(self) -> bool:
        return self.status in REFUSAL_CODES or (self.status == "OK"
                                                and self.verdict in DETECTED_VERDICTS)

    def to_json(self) -> dict:
        return {"id": self.id, "label": self.label, "family": self.family, "status": self.status,
                "verdict": self.verdict, "mode": self.mode, "detected": None if self.error
                else self.detected, "scores": self.scores, "reasons": self.reasons,
                "latency_ms": round(self.latency_ms, 3), **({"detail": self.detail}
                                                            if self.detail else {})}


# ---------------------------------------------------------------------------------------------
# running the corpus


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, disable=not enabled, desc=desc, unit="req", file=sys.stderr,
                dynamic_ncols=True, leave=False)


def _outcome_from_reply(record, reply: bytes, latency_ms: float) -> Outcome:
    from bastion.protos import pb
    outcome = Outcome(record.id, record.label, record.family, "OK", latency_ms=latency_ms)
    try:
        params = pb.ModelInferResponse.FromString(reply).parameters
    except Exception:  # noqa: BLE001 - an unparseable reply carries no verdict
        return outcome
    if "bastion.verdict" in params:
        outcome.verdict = params["bastion.verdict"].string_param
    if "bastion.mode" in params:
        outcome.mode = params["bastion.mode"].string_param
    if "bastion.reasons" in params and params["bastion.reasons"].string_param:
        outcome.reasons = params["bastion.reasons"].string_param.split(",")
    for key in params:
        if key.startswith(SCORE_PREFIX):
            outcome.scores[key[len(SCORE_PREFIX):]] = float(params[key].double_param)
    return outcome


def _outcome_from_error(record, err: grpc.aio.AioRpcError, latency_ms: float) -> Outcome:
    code = err.code().name
    outcome = Outcome(record.id, record.label, record.family, code, latency_ms=latency_ms)
    trailers = {}
    try:
        trailers = {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}
    except Exception:  # noqa: BLE001
        pass
    if code in REFUSAL_CODES:
        outcome.verdict = trailers.get("bastion-verdict") or (
            "throttle" if code == "RESOURCE_EXHAUSTED" else "block")
        outcome.mode = "enforce"
        if trailers.get("bastion-reasons"):
            outcome.reasons = trailers["bastion-reasons"].split(",")
    else:
        outcome.detail = (err.details() or "")[:300]
    return outcome


async def replay_online(records, target: str, concurrency: int, rate: float | None,
                        timeout: float, progress: bool,
                        connect_timeout: float = 15.0) -> list[Outcome]:
    """Send every record's request bytes to ``target``'s ModelInfer, at most ``concurrency`` at
    a time and (with ``rate``) no faster than ``rate`` per second."""
    from bastion.protos import SERVICE
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    results: list[Outcome | None] = [None] * len(records)
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), connect_timeout)
        except asyncio.TimeoutError:
            raise ReplayError(f"bastion replay: cannot reach {target} within "
                              f"{connect_timeout:.0f}s", EXIT_RUNTIME) from None
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
        slots = asyncio.Semaphore(max(1, concurrency))
        bar = _progress(len(records), progress, "replay")
        loop = asyncio.get_running_loop()

        async def one(index: int, record) -> None:
            started = time.perf_counter()
            try:
                try:
                    reply = await infer(record.payload, timeout=timeout)
                except grpc.aio.AioRpcError as err:
                    results[index] = _outcome_from_error(
                        record, err, (time.perf_counter() - started) * 1000)
                else:
                    results[index] = _outcome_from_reply(
                        record, reply, (time.perf_counter() - started) * 1000)
            finally:
                slots.release()
                bar.update(1)

        tasks = []
        began = loop.time()
        try:
            for index, record in enumerate(records):
                if rate:
                    delay = began + index / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await slots.acquire()
                tasks.append(asyncio.create_task(one(index, record)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            bar.close()
    return [r for r in results if r is not None]


class OfflinePipeline:
    """The model's configured pipeline and policy, in-process, exactly as the proxy runs them
    (bastion.proxy.inference): decode the same request bytes, check declared input specs, run
    every stage (``stop_on_block=False``, so every stage scores), then ``policy.decide``."""

    def __init__(self, config, model_name: str):
        from bastion.proxy.state import SidecarState
        if model_name not in config.models:
            raise ReplayError(f"bastion replay: model {model_name!r} is not configured "
                              f"(configured: "
                              f"{', '.join(config.models) or 'none'})")
        self.config = config
        self.model_name = model_name
        self.model = config.models[model_name]
        state = SidecarState(config)
        self.pipeline = state.current.pipelines[model_name]
        self.specs = state.input_specs(model_name)

    def thresholds(self) -> dict[str, float]:
        return thresholds_of_pipeline(self.pipeline, response=False)

    def skipped_stages(self) -> list[str]:
        """Response stages: they need the model's answer, so offline mode cannot run them."""
        return [r.config.stage_id for r in getattr(self.pipeline, "response_runners", [])]

    async def inspect(self, record) -> Outcome:
        from google.protobuf.message import DecodeError

        from bastion.protos import pb
        from bastion.proxy import policy
        from bastion.proxy.inference import request_datatype
        from bastion.proxy.pipeline import RequestContext
        from bastion.protos import codec
        from bastion.transforms.base import InputRejected
        from bastion.transforms.validate import check as check_tensor

        started = time.perf_counter()
        outcome = Outcome(record.id, record.label, record.family, "OK")
        try:
            request = pb.ModelInferRequest.FromString(record.payload)
            if request.model_name != self.model_name:
                raise ReplayError(f"bastion replay: record {record.id!r} is for model "
                                  f"{request.model_name!r}; offline mode runs {self.model_name!r}")
            inputs = codec.decode_request(request, self.config.limits.max_tensor_elements)
            for name, spec in self.specs.items():
                if name in inputs:
                    check_tensor(inputs[name], request_datatype(request, name), spec, name)
            ctx = RequestContext(request_id=record.id, model_name=self.model_name,
                                 model_version=request.model_version, inputs=dict(inputs),
                                 datatypes={t.name: t.datatype for t in request.inputs},
                                 invalid_utf8=self.model.invalid_utf8)
            await self.pipeline.run(ctx, stop_on_block=False)
        except (DecodeError, codec.TensorError, InputRejected) as err:
            outcome.status = "INVALID_ARGUMENT"
            outcome.detail = f"bastion: {err}"[:300] if not isinstance(err, DecodeError) else \
                "bastion: request is not a valid ModelInferRequest message"
            outcome.latency_ms = (time.perf_counter() - started) * 1000
            return outcome
        verdict = policy.decide(ctx.decisions, ctx.scores, self.model.mode)
        outcome.latency_ms = (time.perf_counter() - started) * 1000
        outcome.verdict = verdict.action
        outcome.mode = "enforce" if verdict.enforced else "monitor"
        outcome.scores = {stage: float(score) for stage, score in verdict.scores.items()}
        outcome.reasons = list(verdict.reasons)
        if verdict.blocks:  # what the sidecar answers in enforce mode
            outcome.status = policy.refusal(verdict, record.id)[0].name
        return outcome


async def replay_offline(records, runner: OfflinePipeline, progress: bool) -> list[Outcome]:
    bar = _progress(len(records), progress, "replay (offline)")
    try:
        results = []
        for record in records:
            results.append(await runner.inspect(record))
            bar.update(1)
        return results
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------
# thresholds

_THRESHOLD_LINE = re.compile(r"^bastion_stage_threshold\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _runners(pipeline, response: bool = True) -> list:
    """The pipeline's request stages, then (``response``) its response stages."""
    if pipeline is None:
        return []
    return list(pipeline.runners) + (list(getattr(pipeline, "response_runners", []))
                                      if response else [])


def thresholds_of_pipeline(pipeline, response: bool = True) -> dict[str, float]:
    return {runner.config.stage_id: float(runner.config.common.threshold)
            for runner in _runners(pipeline, response)
            if runner.config.common.threshold is not None}


def thresholds_from_metrics(text: str, model: str) -> dict[str, float]:
    """``bastion_stage_threshold{model,stage}`` values of one model from a /metrics page."""
    out = {}
    for line in text.splitlines():
        match = _THRESHOLD_LINE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        if labels.get("model") == model and "stage" in labels:
            try:
                out[labels["stage"]] = float(match["value"])
            except ValueError:
                continue
    return out


def thresholds_from_admin(admin: str, model: str) -> dict[str, float]:
    import urllib.request
    url = admin if admin.startswith("http") else f"http://{admin}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=10) as reply:
            return thresholds_from_metrics(reply.read().decode("utf-8", "replace"), model)
    except OSError as err:
        raise ReplayError(f"bastion replay: cannot read {url}/metrics: {err}",
                          EXIT_RUNTIME) from None


def pipeline_of_config(config, model: str):
    """The model's pipeline built from ``config`` (None if the model is not configured)."""
    from bastion.proxy.pipeline import build_pipeline
    if model not in config.models:
        return None
    return build_pipeline(model, config.models[model])


def stage_ids(pipeline, response: bool = True) -> list[str]:
    return [runner.config.stage_id for runner in _runners(pipeline, response)]


def load_config_or_exit(path: str):
    from bastion.config import ConfigError, load_config
    try:
        return load_config(path)
    except ConfigError as err:
        raise ReplayError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# metrics


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _finite(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def auroc(labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, str | None]:
    """AUROC with attack as the positive class, or (None, why it was skipped)."""
    if labels.size == 0:
        return None, "skipped: no records"
    if labels.all():
        return None, "skipped: only attack records (no benign class)"
    if not labels.any():
        return None, "skipped: only benign records (no attack class)"
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(labels, scores)), None


def operating_point(benign: np.ndarray, attack: np.ndarray, target_fpr: float) -> dict:
    """TPR at the largest cut on benign scores whose FPR is <= target: flag ``score > cut``."""
    if benign.size == 0:
        return {"target_fpr": target_fpr, "threshold": None, "fpr": None, "tpr": None,
                "note": "skipped: no benign records to set a threshold"}
    ordered = np.sort(benign)[::-1]
    allowed = int(math.floor(target_fpr * benign.size + 1e-9))
    if allowed >= benign.size:
        cut = -math.inf
    else:
        cut = float(ordered[allowed])
    tpr = float(np.mean(attack > cut)) if attack.size else None
    return {"target_fpr": target_fpr, "threshold": _finite(cut), "rule": "score > threshold",
            "fpr": float(np.mean(benign > cut)), "tpr": tpr,
            **({} if attack.size else {"note": "no attack records"})}


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict:
    tp = int(np.sum(labels & predicted))
    fn = int(np.sum(labels & ~predicted))
    fp = int(np.sum(~labels & predicted))
    tn = int(np.sum(~labels & ~predicted))
    return {"tp": tp, "fn": fn, "fp": fp, "tn": tn, "tpr": _rate(tp, tp + fn),
            "fpr": _rate(fp, fp + tn), "precision": _rate(tp, tp + fp)}


def latency(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    array = np.asarray(values, dtype=np.float64)
    return {"n": int(array.size), "p50_ms": float(np.percentile(array, 50)),
            "p99_ms": float(np.percentile(array, 99)), "mean_ms": float(array.mean()),
            "max_ms": float(array.max())}


@dataclasses.dataclass
class Scored:
    """Labels and scores of one slice (the arrays the plots are drawn from)."""
    labels: np.ndarray    # bool, True = attack
    scores: np.ndarray

    @property
    def benign(self) -> np.ndarray:
        return self.scores[~self.labels]

    @property
    def attack(self) -> np.ndarray:
        return self.scores[self.labels]


def overall_scores(outcomes: list[Outcome], thresholds: dict[str, float]) -> tuple[np.ndarray, str]:
    """One score per record for the overall ROC: the largest score/threshold over stages with a
    known positive threshold (a detected record counts at least 1), else detected as 0/1."""
    usable = {s: t for s, t in thresholds.items() if t and t > 0}
    if usable and any(s in o.scores for o in outcomes for s in usable):
        values = []
        for o in outcomes:
            ratio = max((o.scores[s] / t for s, t in usable.items() if s in o.scores), default=0.0)
            values.append(max(ratio, 1.0) if o.detected else ratio)
        return (np.asarray(values, dtype=np.float64),
                "max over stages of score / threshold (a detected record counts at least 1)")
    return (np.asarray([float(o.detected) for o in outcomes], dtype=np.float64),
            "detected (0/1): no per-stage scores with known thresholds")


def _family_order(outcomes: list[Outcome]) -> list[str]:
    labels = collections.defaultdict(set)
    for o in outcomes:
        labels[o.family].add(o.label)
    return sorted(labels, key=lambda f: ("attack" in labels[f], f))


def compute_report(outcomes: list[Outcome], thresholds: dict[str, float], target_fpr: float,
                   stage_order: list[str] | None = None) -> tuple[dict, dict[str, Scored]]:
    """The report's numbers, and the per-slice score arrays (``overall`` and each stage).
    Stages are listed in ``stage_order`` (the pipeline's, when known), then the rest by name."""
    valid = [o for o in outcomes if not o.error]
    labels = np.asarray([o.label == "attack" for o in valid], dtype=bool)
    detected = np.asarray([o.detected for o in valid], dtype=bool)
    scores, score_kind = overall_scores(valid, thresholds)
    arrays = {"overall": Scored(labels, scores)}

    def summary(mask: np.ndarray, rows: list[Outcome], benign_reference: Scored) -> dict:
        sub_labels, sub_scores = labels[mask], scores[mask]
        entry = {"records": int(mask.sum()) + sum(o.error for o in rows),
                 "benign": int((~sub_labels).sum()), "attack": int(sub_labels.sum()),
                 **confusion(sub_labels, detected[mask])}
        entry["detected"] = int(detected[mask].sum())
        if sub_labels.any() and not (~sub_labels).any() and benign_reference.benign.size:
            # an attack-only slice (a family): separated from all benign records
            value, note = auroc(np.concatenate([np.zeros(benign_reference.benign.size, bool),
                                                np.ones(sub_labels.sum(), bool)]),
                                np.concatenate([benign_reference.benign, sub_scores]))
            note = note or "vs all benign records"
        else:
            value, note = auroc(sub_labels, sub_scores)
        entry["auroc"], entry["auroc_note"] = value, note
        point = operating_point(benign_reference.benign, sub_scores[sub_labels], target_fpr)
        entry["tpr_at_fpr"] = point
        errors = collections.Counter(o.status for o in rows if o.error)
        entry["errors"] = sum(errors.values())
        entry["errors_by_code"] = dict(sorted(errors.items()))
        entry["latency"] = latency([o.latency_ms for o in rows if not o.error])
        return entry

    overall = summary(np.ones(len(valid), bool), outcomes, arrays["overall"])
    overall["score"] = score_kind

    order = list(stage_order or []) + [s for s in thresholds if s not in (stage_order or [])]
    stage_ids = sorted({s for o in valid for s in o.scores} | set(thresholds),
                       key=lambda s: (order.index(s) if s in order else len(order), s))
    stages = {}
    for stage in stage_ids:
        have = np.asarray([stage in o.scores for o in valid], dtype=bool)
        stage_labels = labels[have]
        stage_scores = np.asarray([o.scores[stage] for o in valid if stage in o.scores],
                                  dtype=np.float64)
        arrays[stage] = Scored(stage_labels, stage_scores)
        threshold = thresholds.get(stage)
        entry = {"threshold": threshold, "scored": int(have.sum()),
                 "benign": int((~stage_labels).sum()), "attack": int(stage_labels.sum())}
        if threshold is not None:
            entry.update(confusion(stage_labels, stage_scores >= threshold))
        else:
            entry.update({"tp": None, "fn": None, "fp": None, "tn": None, "tpr": None,
                          "fpr": None, "precision": None,
                          "note": "no threshold known (pass --admin or --config)"})
        entry["auroc"], entry["auroc_note"] = auroc(stage_labels, stage_scores)
        entry["tpr_at_fpr"] = operating_point(arrays[stage].benign, arrays[stage].attack,
                                              target_fpr)
        entry["score_mean"] = {"benign": _finite(arrays[stage].benign.mean())
                               if arrays[stage].benign.size else None,
                               "attack": _finite(arrays[stage].attack.mean())
                               if arrays[stage].attack.size else None}
        stages[stage] = entry

    families = {}
    for family in _family_order(outcomes):
        rows = [o for o in outcomes if o.family == family]
        mask = np.asarray([o.family == family for o in valid], dtype=bool)
        entry = summary(mask, rows, arrays["overall"])
        entry["label"] = ("attack" if entry["attack"] and not entry["benign"] else
                          "benign" if entry["benign"] and not entry["attack"] else
                          "mixed" if entry["benign"] else
                          next((o.label for o in rows), "?"))
        per_stage = {}
        for stage in stage_ids:
            fam = [o for o in valid if o.family == family and stage in o.scores]
            if not fam:
                continue
            values = np.asarray([o.scores[stage] for o in fam], dtype=np.float64)
            fam_labels = np.asarray([o.label == "attack" for o in fam], dtype=bool)
            threshold = thresholds.get(stage)
            item = {"scored": len(fam)}
            if threshold is not None:
                hit = values >= threshold
                item["tpr"] = _rate(int(hit[fam_labels].sum()), int(fam_labels.sum()))
                item["fpr"] = _rate(int(hit[~fam_labels].sum()), int((~fam_labels).sum()))
            if fam_labels.all() and arrays[stage].benign.size:
                item["auroc"], note = auroc(
                    np.concatenate([np.zeros(arrays[stage].benign.size, bool),
                                    np.ones(values.size, bool)]),
                    np.concatenate([arrays[stage].benign, values]))
            else:
                item["auroc"], note = auroc(fam_labels, values)
            if note:
                item["auroc_note"] = note
            per_stage[stage] = item
        entry["stages"] = per_stage
        families[family] = entry

    modes = collections.Counter(o.mode or "none" for o in outcomes)
    verdicts = collections.Counter(o.verdict or ("error" if o.error else "none")
                                   for o in outcomes)
    report = {"overall": overall, "families": families, "stages": stages,
              "annotations": {"modes": dict(modes), "verdicts": dict(verdicts)}}
    return report, arrays


# ---------------------------------------------------------------------------------------------
# gates

GATE_METRICS = ("tpr", "fpr", "auroc", "tpr_at_fpr", "precision", "errors", "p50_ms", "p99_ms")
_GATE = re.compile(r"^(?P<metric>[A-Za-z_0-9]+)(?::(?P<scope>[^<>=!]+))?"
                   r"(?P<op>>=|<=|==|!=|>|<)(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


@dataclasses.dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    scope: str | None
    op: str
    value: float


def parse_gates(spec: str | list[str] | None) -> list[Gate]:
    """``"tpr:adv_suffix>=0.99 fpr<=0.01, errors<=0"`` -> gates; raises ReplayError (exit 2)."""
    if not spec:
        return []
    text = " ".join(spec) if isinstance(spec, list) else spec
    gates = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        match = _GATE.match(item)
        if match is None:
            raise ReplayError(f"bastion replay: --fail-under: cannot parse {item!r} (expected "
                              "METRIC[:FAMILY|STAGE]OPVALUE, e.g. tpr:adv_suffix>=0.99, "
                              "fpr<=0.01, errors<=0)")
        metric = match["metric"].lower()
        if metric not in GATE_METRICS:
            raise ReplayError(f"bastion replay: --fail-under: unknown metric {metric!r} in "
                              f"{item!r} (known: {', '.join(GATE_METRICS)})")
        scope = match["scope"]
        gates.append(Gate(item, metric, None if scope in (None, "", "overall") else scope,
                          match["op"], float(match["value"])))
    return gates


def _gate_value(gate: Gate, report: dict) -> tuple[float | None, str]:
    """(value, where/why); raises ReplayError for a scope or metric that cannot apply."""
    families, stages = report["families"], report["stages"]
    if gate.scope is None:
        kind, entry = "overall", report["overall"]
    elif gate.scope in families:
        kind, entry = "family", families[gate.scope]
    elif gate.scope in stages:
        kind, entry = "stage", stages[gate.scope]
    else:
        raise ReplayError(
            f"bastion replay: --fail-under {gate.text!r}: unknown family or stage "
            f"{gate.scope!r} (families: {', '.join(families) or 'none'}; stages: "
            f"{', '.join(stages) or 'none'})")
    metric = gate.metric
    if kind == "stage" and metric in ("errors", "p50_ms", "p99_ms"):
        raise ReplayError(f"bastion replay: --fail-under {gate.text!r}: {metric} is not a "
                          "per-stage metric (use it overall or per family)")
    if kind == "family":
        if metric == "tpr" and not entry["attack"] and entry["label"] == "benign":
            raise ReplayError(f"bastion replay: --fail-under {gate.text!r}: family "
                              f"{gate.scope!r} has no attack records, so no TPR (use fpr)")
        if metric == "fpr" and not entry["benign"] and entry["label"] == "attack":
            raise ReplayError(f"bastion replay: --fail-under {gate.text!r}: family "
                              f"{gate.scope!r} has no benign records, so no FPR (use tpr)")
    if metric == "tpr_at_fpr":
        value = entry["tpr_at_fpr"].get("tpr")
        why = entry["tpr_at_fpr"].get("note", "")
    elif metric in ("p50_ms", "p99_ms"):
        value, why = entry["latency"][metric], ""
    elif metric == "auroc":
        value, why = entry["auroc"], entry.get("auroc_note") or ""
    else:
        value, why = entry.get(metric), entry.get("note", "")
    return value, why


def evaluate_gates(gates: list[Gate], report: dict) -> list[dict]:
    results = []
    for gate in gates:
        value, why = _gate_value(gate, report)
        if value is None:
            results.append({"gate": gate.text, "value": None, "ok": False,
                            "message": f"not available ({why or 'no records for it'})"})
            continue
        ok = _OPS[gate.op](value, gate.value)
        results.append({"gate": gate.text, "value": value, "ok": bool(ok),
                        "message": "met" if ok else f"unmet: {gate.metric} is {value:.4g}"})
    return results


# ---------------------------------------------------------------------------------------------
# outputs


def _safe_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", stage)


def write_plots(out: pathlib.Path, arrays: dict[str, Scored], thresholds: dict[str, float],
                report: dict) -> dict:
    """roc.png (every stage with both classes, and overall) and hist-<stage>.png per stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    plots: dict = {"roc": None, "histograms": {}}
    curves = [(name, data) for name, data in arrays.items()
              if data.labels.any() and (~data.labels).any()]
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
        for name, data in curves:
            fpr, tpr, _ = roc_curve(data.labels, data.scores)
            value = (report["overall"] if name == "overall" else report["stages"][name])["auroc"]
            style = {"linestyle": "--", "color": "black"} if name == "overall" else {}
            ax.plot(fpr, tpr, drawstyle="default", linewidth=1.8,
                    label=f"{name} (AUROC {value:.3f})", **style)
            threshold = thresholds.get(name)
            if threshold is not None:
                entry = report["stages"][name]
                if entry["fpr"] is not None and entry["tpr"] is not None:
                    ax.plot([entry["fpr"]], [entry["tpr"]], marker="o", markersize=6,
                            color=ax.lines[-1].get_color())
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("false positive rate (benign flagged)")
        ax.set_ylabel("true positive rate (attacks detected)")
        ax.set_title("ROC per stage (dot: configured threshold)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "roc.png")
        plt.close(fig)
        plots["roc"] = "roc.png"

    for name, data in arrays.items():
        if name == "overall" or data.scores.size == 0:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        low, high = float(data.scores.min()), float(data.scores.max())
        threshold = thresholds.get(name)
        if threshold is not None:
            low, high = min(low, threshold), max(high, threshold)
        if high - low < 1e-9:
            low, high = low - 0.5, high + 0.5
        pad = (high - low) * 0.04  # keep a threshold at the edge visible
        low, high = low - pad, high + pad
        bins = np.linspace(low, high, min(40, max(10, int(np.unique(data.scores).size) * 2)) + 1)
        for label, values, color in (("benign", data.benign, "tab:blue"),
                                     ("attack", data.attack, "tab:red")):
            if values.size:
                ax.hist(values, bins=bins, alpha=0.55, color=color,
                        label=f"{label} (n={values.size})", edgecolor="white", linewidth=0.4)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2,
                       label=f"threshold {threshold:g}")
        ax.set_xlabel(f"bastion.score.{name}")
        ax.set_ylabel("records")
        ax.set_title(f"{name}: scores, benign vs attack")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        filename = f"hist-{_safe_name(name)}.png"
        fig.savefig(out / filename)
        plt.close(fig)
        plots["histograms"][name] = filename
    return plots


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
    lines += ["Per-record results (ids, statuses, verdicts, scores; no texts): "
              "[records.jsonl](records.jsonl). Machine-readable: [report.json](report.json).", ""]
    return "\n".join(lines)


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


# ---------------------------------------------------------------------------------------------
# the command


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


def run(args: argparse.Namespace) -> int:
    from bastion import corpus

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
    config = load_config_or_exit(args.config) if args.config else None
    runner = OfflinePipeline(config, args.model) if args.offline else None

    try:
        rows = corpus.select(corpus.read_rows(args.data), args.limit, args.seed)
        records = corpus.encode_rows(rows, args.data, args.model,
                                     text_input=args.input or corpus.DEFAULT_TEXT_INPUT,
                                     tensor_input=_tensor_input_name(args, rows, config),
                                     shape=_parse_shape(args.shape))
    except corpus.CorpusError as err:
        raise ReplayError(f"bastion replay: {err}") from None

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
    failed = [g for g in gate_results if not g["ok"]]
    if failed:
        print("bastion replay: gates failed:", file=sys.stderr)
        for gate in failed:
            print(f"  {gate['gate']}: {gate['message']}", file=sys.stderr)
        return EXIT_GATES
    return EXIT_OK


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


if __name__ == "__main__":
    raise SystemExit(main())
