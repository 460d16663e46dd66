"""Policy: fold per-stage decisions into one verdict, and the verdict contract clients rely on.

Severity order: allow < transform < flag < throttle < block. In ``enforce`` mode the verdict is
carried out; in ``monitor`` mode nothing is blocked or changed, and every response says what
would have happened. Shadow stages never act in either mode.
"""
from __future__ import annotations

import dataclasses

import grpc

from bastion.protos import pb

ACTIONS = ("allow", "transform", "flag", "throttle", "block")
SEVERITY = {action: rank for rank, action in enumerate(ACTIONS)}

VERDICT_KEY = "bastion.verdict"
REASONS_KEY = "bastion.reasons"
SCORE_PREFIX = "bastion.score."
REQUEST_ID_PARAM = "bastion.request_id"
MODE_KEY = "bastion.mode"
VERSION_KEY = "bastion.config_version"
VERSION_TRAILER = "bastion-config-version"


@dataclasses.dataclass(frozen=True)
class Decision:
    stage: str
    action: str
    score: float | None
    reasons: list[str]
    threshold: float | None = None
    shadow: bool = False
    # gRPC status code name to refuse with instead of the action's default (e.g. a smoothing
    # stage abstaining with UNAVAILABLE).
    status: str | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    action: str                 # what the policy decided (what monitor mode would have done)
    enforced: bool              # False in monitor mode: the request goes through unchanged
    deciding: Decision | None   # the most severe acting decision
    reasons: tuple[str, ...]
    scores: dict[str, float]
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    decisions: tuple[Decision, ...] = ()
    # Only set when the audit log asks for excerpts: the text behind the highest detector score.
    suspicious_text: str | None = None
    # The defense version (bastion/defense_version.py) of the chain that judged the request.
    config_version: str = ""
    # The client's canary cohort (proxy/canary.py): canary, control, or all (no canary).
    cohort: str = "all"

    @property
    def blocks(self) -> bool:
        return self.enforced and self.action in ("block", "throttle")

    @property
    def forwards_transformed(self) -> bool:
        return self.enforced and self.action != "block"


def decide(decisions: list[Decision], scores: dict[str, float], mode: str,
           config_version: str = "", cohort: str = "all") -> Verdict:
    acting = [d for d in decisions if not d.shadow]
    deciding = max(acting, key=lambda d: SEVERITY[d.action], default=None)
    action = deciding.action if deciding is not None else "allow"
    reasons = []
    for decision in decisions:
        for reason in decision.reasons:
            tagged = f"shadow:{reason}" if decision.shadow else reason
            if tagged not in reasons:
                reasons.append(tagged)
    thresholds = {d.stage: d.threshold for d in decisions if d.threshold is not None}
    return Verdict(action, mode == "enforce", deciding, tuple(reasons), dict(scores), thresholds,
                   tuple(decisions), config_version=config_version, cohort=cohort)


# Reasons named in a refusal's details at most (the trailer bastion-reasons has them all).
MAX_DETAIL_REASONS = 12


def _acting_stages(verdict: Verdict) -> str:
    """``stage (r1, r2)`` for every stage that acted at the verdict's severity, deciding one
    first: a block names all of its reasons, not only the first stage's first one."""
    deciding = verdict.deciding
    if deciding is None:
        return f"policy ({verdict.action})"
    acting = [deciding] + [d for d in verdict.decisions if d is not deciding and not d.shadow
                           and d.action == deciding.action]
    parts, named = [], 0
    for decision in acting:
        reasons = decision.reasons or [verdict.action]
        shown = reasons[:max(0, MAX_DETAIL_REASONS - named)]
        named += len(shown)
        more = f", +{len(reasons) - len(shown)} more" if len(shown) < len(reasons) else ""
        if shown:
            parts.append(f"{decision.stage} ({', '.join(shown)}{more})")
        elif more:
            parts.append(f"{decision.stage} (+{len(reasons)} more)")
    return " and ".join(parts)


def refusal(verdict: Verdict, request_id: str, retry_after_ms: int = 1000):
    """(status code, details, trailers) for a verdict that blocks or throttles."""
    deciding = verdict.deciding
    first = deciding.reasons[0] if deciding and deciding.reasons else verdict.action
    by = _acting_stages(verdict)
    trailers = [("bastion-verdict", verdict.action),
                ("bastion-reasons", ",".join(verdict.reasons) or first),
                ("bastion-request-id", request_id)]
    if verdict.config_version:
        trailers.append((VERSION_TRAILER, verdict.config_version))
    if verdict.action == "throttle":
        trailers.append(("retry-after-ms", str(retry_after_ms)))
        return (grpc.StatusCode.RESOURCE_EXHAUSTED, f"bastion: throttled by {by}",
                tuple(trailers))
    if deciding is not None and deciding.status:
        return (getattr(grpc.StatusCode, deciding.status), f"bastion: refused by {by}",
                tuple(trailers))
    return (grpc.StatusCode.PERMISSION_DENIED, f"bastion: blocked by {by}", tuple(trailers))


def needs_annotation(verdict: Verdict) -> bool:
    """Monitor mode annotates every response; enforce mode only those with something to say
    (a non-allow verdict, a shadow stage that would have acted, a stage that failed open), so
    plainly allowed traffic stays byte-identical to what the upstream sent."""
    return not verdict.enforced or verdict.action != "allow" or bool(verdict.reasons)


def set_parameters(response: pb.ModelInferResponse, values: dict) -> None:
    """Typed response parameters from python values (bool, int, float, str)."""
    params = response.parameters
    for key, value in values.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param",
                 str: "string_param"}[type(value)]
        setattr(params[key], field, value)


def annotate(response: pb.ModelInferResponse, verdict: Verdict, request_id: str) -> None:
    params = response.parameters
    params[VERDICT_KEY].string_param = verdict.action
    params[REASONS_KEY].string_param = ",".join(verdict.reasons)
    params[MODE_KEY].string_param = "enforce" if verdict.enforced else "monitor"
    params[REQUEST_ID_PARAM].string_param = request_id
    if verdict.config_version:
        params[VERSION_KEY].string_param = verdict.config_version
    for stage, score in verdict.scores.items():
        params[SCORE_PREFIX + stage].double_param = score
