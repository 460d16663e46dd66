"""``--fail-under`` gates: parsed from text, evaluated against a report."""
from __future__ import annotations

import dataclasses
import re

from bastion.replay.outcome import ReplayError

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
