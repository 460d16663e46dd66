"""What happened to one replayed record, the command's exit codes and error, and the progress
bar both runners show."""
from __future__ import annotations

import dataclasses
import sys

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_GATES = 0, 1, 2, 3
DETECTED_VERDICTS = frozenset({"flag", "throttle", "block"})
REFUSAL_CODES = frozenset({"PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})
SCORE_PREFIX = "bastion.score."


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


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, disable=not enabled, desc=desc, unit="req", file=sys.stderr,
                dynamic_ncols=True, leave=False)
