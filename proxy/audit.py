"""Audit log: one JSON line per non-allow decision, refused request and (with client limits)
tier change.

Lines validate against docs/audit-log.schema.json. Client identities are keyed hashes and raw
inputs are never written.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import re
import secrets
from collections.abc import Callable
import sys

from opentelemetry import trace

SCHEMA_VERSION = 1


_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"\b(?:https?|ftp)://\S+", re.I)
_DIGITS = re.compile(r"\d")


CLIENT_REFUSAL_PREFIX = "client_"
OUTPUT_STOP_PREFIX = "output-stop:"  # an answer the output scan stopped (proxy/output_guard.py)
SHED_PREFIX = "overloaded:"          # a stage at capacity shed the request (proxy/inference.py)


def client_refusal_verdict(reason: str) -> str:
    """``client_tier_blocked`` -> block; rate limits, throttled tier, no backend -> throttle
    (the same as limiter.refusal's bastion-verdict trailer)."""
    if reason == f"{CLIENT_REFUSAL_PREFIX}tier_blocked" or reason.endswith("_too_large"):
        return "block"  # retrying cannot help (a token request larger than the whole budget)
    return "throttle"


def redact(text: str, limit: int) -> str:
    """An excerpt safe enough for an audit log an operator opted into: URLs, e-mail addresses
    and every digit masked (numbers carry account ids, phone numbers, keys), whitespace
    collapsed, cut to ``limit`` characters."""
    text = _URL.sub("[url]", text)
    text = _EMAIL.sub("[email]", text)
    text = _DIGITS.sub("#", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


class AuditLog:
    def __init__(self, config):
        self.enabled = config.enabled
        self.include_excerpt = config.include_excerpt
        self.excerpt_chars = config.excerpt_chars
        #: The active defense version (the sidecar sets it), named in every record.
        self.config_version: Callable[[], str] | None = None
        self.logger = logging.getLogger(f"bastion.audit.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        if config.output == "stdout":
            handler: logging.Handler = logging.StreamHandler(sys.stdout)
        else:
            handler = logging.handlers.RotatingFileHandler(
                config.output, maxBytes=config.max_bytes, backupCount=config.backup_count,
                encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)
        key = os.environ.get(config.client_hash_key_env)
        self._key = key.encode() if key else secrets.token_bytes(32)

    def client_hash(self, identity: str) -> str:
        return hmac.new(self._key, identity.encode(), hashlib.sha256).hexdigest()[:32]

    def _write(self, record: dict) -> None:
        if self.enabled and self.config_version is not None:
            record["config_version"] = self.config_version()
        if self.enabled:
            self.logger.info(json.dumps(record, separators=(",", ":"), sort_keys=True))

    def decision(self, *, request_id: str, client: str, model: str, method: str, status: str,
                 verdict=None, reason: str | None = None) -> None:
        """A refused request, or one whose verdict is not allow (monitor mode included)."""
        record = {
            "schema": SCHEMA_VERSION,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "event": "decision",
            "request_id": request_id,
            "trace_id": _trace_id(),
            "client": self.client_hash(client),
            "model": model,
            "method": method,
            "status": status,
        }
        if verdict is not None:
            deciding = verdict.deciding
            record.update({
                "mode": "enforce" if verdict.enforced else "monitor",
                "verdict": verdict.action,
                "reasons": list(verdict.reasons),
                "stage": deciding.stage if deciding else None,
                "scores": {k: round(v, 6) for k, v in verdict.scores.items()},
                "thresholds": verdict.thresholds,
            })
            if self.include_excerpt and verdict.suspicious_text:
                record["excerpt"] = redact(verdict.suspicious_text, self.excerpt_chars)
        elif reason and reason.startswith(CLIENT_REFUSAL_PREFIX):
            # Refused before inspection by the client limits (proxy/clients.py): what they did,
            # as the bastion-verdict trailer says, not "invalid" (nothing was wrong with it).
            record.update({"mode": "enforce", "verdict": client_refusal_verdict(reason),
                           "reasons": [reason], "stage": "clients", "scores": {},
                           "thresholds": {}})
        elif reason and reason.startswith(OUTPUT_STOP_PREFIX):
            # The answer was refused after the model generated it (proxy/output_guard.py).
            record.update({"mode": "enforce", "verdict": "block",
                           "reasons": reason.removeprefix(OUTPUT_STOP_PREFIX).split(","),
                           "stage": "output", "scores": {}, "thresholds": {}})
        elif reason and reason.startswith(SHED_PREFIX):
            record.update({"mode": "enforce", "verdict": "throttle", "reasons": [reason],
                           "stage": reason.removeprefix(SHED_PREFIX), "scores": {},
                           "thresholds": {}})
        else:
            record.update({"mode": None, "verdict": "invalid", "reasons": [reason or "malformed"],
                           "stage": None, "scores": {}, "thresholds": {}})
        self._write(record)

    def output(self, *, request_id: str, client: str, model: str, method: str, action: str,
               findings: list[dict]) -> None:
        """Something the output scan found in generated text (redacted or stopped): rule names,
        kinds and offsets only, never the text."""
        self._write({
            "schema": SCHEMA_VERSION,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "event": "output", "request_id": request_id, "trace_id": _trace_id(),
            "client": self.client_hash(client), "model": model, "method": method,
            "action": action, "findings": findings})

    def tier_change(self, *, client: str, old: str, new: str, score: float, model: str | None) -> None:
        self._write({
            "schema": SCHEMA_VERSION,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "event": "tier_change", "client": self.client_hash(client), "model": model,
            "from": old, "to": new, "suspicion": round(score, 6)})

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
