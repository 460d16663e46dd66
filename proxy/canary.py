"""Canary enforcement: a model or a stage enforces for a share of clients and runs in shadow
(monitor) for the rest, the share sticky by client identity.

Each client of a model gets one bucket in [0, 100) from a hash of the model name and its
identity, so a client stays in its cohort across requests, reloads and replicas, and a wider
share keeps the clients of the narrower one (a client at 3.2 enforces at 5 % and at 20 %).
``enforce_percent: P`` on a model (``mode: enforce``) or a stage acts for the clients below P.
Cohorts, as labels on the verdict, request and latency metrics: ``canary`` (enforced by at least
one canary), ``control`` (a canary is configured, the client is outside every one), ``all`` (no
canary configured).
"""
from __future__ import annotations

import hashlib

CANARY, CONTROL, ALL = "canary", "control", "all"


def bucket(identity: str, model: str) -> float:
    """The client's sticky bucket in [0, 100) for ``model``."""
    digest = hashlib.sha256(f"{model}\0{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def enforces(percent: float | None, client_bucket: float | None) -> bool:
    """Whether a canary of ``percent`` enforces for the client (no canary: always)."""
    if percent is None:
        return True
    return client_bucket is not None and client_bucket < percent
