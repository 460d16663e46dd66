"""The sidecar's swappable state: one immutable snapshot of config and built pipelines.

Handlers read ``SidecarState.current`` once per request, so a reload (which replaces the whole
snapshot) takes effect between requests and never mid-request.
"""
from __future__ import annotations

import dataclasses

from bastion.config import Config
from bastion.proxy.pipeline import Pipeline, build_pipeline


@dataclasses.dataclass(frozen=True)
class Snapshot:
    config: Config
    pipelines: dict[str, Pipeline]


def build_snapshot(config: Config, metrics=None) -> Snapshot:
    return Snapshot(config, {name: build_pipeline(name, model, metrics)
                             for name, model in config.models.items()})


class SidecarState:
    def __init__(self, config: Config, metrics=None):
        self.metrics = metrics
        self.current = build_snapshot(config, metrics)

    def replace(self, config: Config) -> None:
        """Build the new snapshot fully, then swap it in with one assignment."""
        self.current = build_snapshot(config, self.metrics)
