"""Stage registry: config names -> how to build a transform or detector from validated options.

Modules that provide stages call :func:`register` at import time; :data:`STAGE_MODULES` lists
them so the registry is complete before any config is validated.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

StageKind = Literal["transform", "detector", "response"]

# Modules whose import registers stages (kept here, not discovered, so the set is explicit).
STAGE_MODULES = (
    "bastion.transforms.text",
    "bastion.transforms.image",
    "bastion.transforms.validate",
    "bastion.detectors.signatures",
    "bastion.detectors.fault",
    "bastion.detectors.squeeze",
    "bastion.detectors.smoothing",
    "bastion.detectors.upstream_features",
    "bastion.detectors.feature_ensemble",
    "bastion.detectors.lm",
    "bastion.detectors.anomaly",
    "bastion.detectors.embedding",
    "bastion.detectors.attack_library",
    "bastion.detectors.classifier",
)


class StageOptions(BaseModel):
    """Base for each stage's own options: unknown keys are errors, values are immutable."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Options that name a file or folder. A relative path written in a config file resolves
    #: against the config file's folder (see ``bastion.proxy.pipeline.resolve_paths``), so a
    #: config works from any working directory. A stage whose option of one of these names is
    #: not a path overrides this; values with a scheme prefix (``builtin:...``) are left alone.
    path_options: ClassVar[tuple[str, ...]] = ("state", "encoder", "library", "rules", "model")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    kind: StageKind
    options: type[StageOptions]
    build: Callable[[StageOptions], object]  # -> Transform | Detector
    # Whether the stage is CPU-heavy enough to run in a worker thread (JPEG, median on big images).
    offload: bool = False


REGISTRY: dict[str, StageSpec] = {}
_loaded = False


def register(name: str, kind: StageKind, options: type[StageOptions],
             build: Callable[[StageOptions], object], offload: bool = False) -> None:
    if name in REGISTRY:
        raise ValueError(f"stage {name!r} registered twice")
    REGISTRY[name] = StageSpec(name, kind, options, build, offload)


def registry() -> dict[str, StageSpec]:
    global _loaded
    if not _loaded:
        for module in STAGE_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module:  # a stage module's own dependency is missing: say so
                    raise
        _loaded = True
    return REGISTRY
