"""The sidecar's swappable state: one immutable snapshot of config and built pipelines.

Handlers read ``SidecarState.current`` once per request, so a reload (which replaces the whole
snapshot) takes effect between requests and never mid-request.
"""
from __future__ import annotations

import dataclasses

import collections
import datetime

from bastion.config import Config
from bastion.defense_version import DefenseVersion, defense_version
from bastion.proxy.output_guard import ModelOutput, build_model_output
from bastion.proxy.pipeline import Pipeline, build_pipeline
from bastion.transforms.validate import TensorSpec


@dataclasses.dataclass(frozen=True)
class Snapshot:
    config: Config
    pipelines: dict[str, Pipeline]
    # Model -> its built `output` section (scanner, tensor, detectors), where it has one.
    outputs: dict[str, ModelOutput] = dataclasses.field(default_factory=dict)
    version: DefenseVersion | None = None


def build_snapshot(config: Config, metrics=None) -> Snapshot:
    version = defense_version(config)
    pipelines = {name: build_pipeline(name, model, metrics, stages=config.built_stages(name))
                 for name, model in config.models.items()}
    for pipeline in pipelines.values():
        pipeline.config_version = version.digest
    return Snapshot(config, pipelines,
                    {name: build_model_output(name, model.output)
                     for name, model in config.models.items() if model.output is not None},
                    version)


def _publish(snapshot: Snapshot, metrics) -> Snapshot:
    if metrics is not None:
        metrics.set_thresholds(snapshot)
        if snapshot.version is not None:
            metrics.set_defense_version(snapshot.version.digest)
    return snapshot


@dataclasses.dataclass(frozen=True)
class LoadRecord:
    """One config load: the version it produced (or the one kept, on failure), when, how."""
    version: str
    loaded_at: str
    result: str                 # "initial", "reloaded", "unchanged" or "failure: ..."
    files: int = 0


class SidecarState:
    def __init__(self, config: Config, metrics=None):
        self.metrics = metrics
        self.current = _publish(build_snapshot(config, metrics), metrics)
        #: The last loads (initial, reloads, failed reloads), newest last: the admin /version.
        self.history: collections.deque[LoadRecord] = collections.deque(maxlen=10)
        self.record_load("initial")
        # Input specs learned from the upstream's ModelMetadata, per model; kept across reloads.
        self.learned: dict[str, dict[str, TensorSpec]] = {}

    def input_specs(self, model_name: str) -> dict[str, TensorSpec]:
        """Datatype/shape rules for a configured model: learned, overridden by config."""
        model = self.current.config.models.get(model_name)
        if model is None:
            return {}
        specs = dict(self.learned.get(model_name, {})) if model.learn_inputs else {}
        for name, declared in model.inputs.items():
            datatype = declared.datatype or ("BYTES" if declared.kind == "text" else None)
            if datatype or declared.shape:
                learned = specs.get(name)
                specs[name] = TensorSpec(
                    datatype=datatype or (learned.datatype if learned else None),
                    shape=tuple(declared.shape) if declared.shape else
                    (learned.shape if learned else None), finite=False)
        return specs

    def build(self, config: Config) -> Snapshot:
        return build_snapshot(config, self.metrics)

    def replace_snapshot(self, snapshot: Snapshot) -> None:
        """Swap in a fully built snapshot with one assignment (atomic between requests)."""
        previous = self.current.version
        self.current = _publish(snapshot, self.metrics)
        same = previous is not None and snapshot.version == previous
        self.record_load("unchanged" if same else "reloaded")

    def record_load(self, result: str) -> None:
        """Note a load (a failed reload keeps the current version; ``result`` says why)."""
        version = self.current.version
        self.history.append(LoadRecord(
            version.digest if version else "", datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), result, len(version.files) if version else 0))

    def version_report(self) -> dict:
        """What the admin endpoint /version answers."""
        version = self.current.version
        return {"active": version.digest if version else "",
                "files": dict(sorted(version.files.items())) if version else {},
                "history": [dataclasses.asdict(r) for r in self.history]}
