"""Stage registry: config names -> how to build a transform or detector from validated options.

A stage module registers its stages when it is imported, with :func:`register` or the
:func:`stage` decorator. Which modules that are is not known here: the built-in ones are listed
by :mod:`bastion.stage_catalog`, and other installed packages add theirs through the
``bastion.stages`` entry-point group (:func:`load_plugins`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

StageKind = Literal["transform", "detector", "response"]

#: Entry-point group of third-party stages: each entry names a module (``pkg.stages``) or an
#: object in one (``pkg.stages:Shout``); loading it imports the module, which registers.
ENTRY_POINT_GROUP = "bastion.stages"


class StageOptions(BaseModel):
    """Base for each stage's own options: unknown keys are errors, values are immutable."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Options that name a file or folder. A relative path written in a config file resolves
    #: against the config file's folder (see ``bastion.stage_config.resolve_paths``), so a
    #: config works from any working directory. A stage whose option of one of these names is
    #: not a path overrides this; values with a scheme prefix (``builtin:...``) are left alone.
    path_options: ClassVar[tuple[str, ...]] = ("state", "encoder", "library", "rules", "model")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    kind: StageKind
    options: type[StageOptions]
    build: Callable[[StageOptions], object]  # -> Transform | Detector | ResponseStage
    # Whether the stage is CPU-heavy enough to run in a worker thread (JPEG, median on big images).
    offload: bool = False


REGISTRY: dict[str, StageSpec] = {}

Build = TypeVar("Build", bound=Callable)


def register(name: str, kind: StageKind, options: type[StageOptions],
             build: Callable[[StageOptions], object], offload: bool = False) -> None:
    if name in REGISTRY:
        raise ValueError(f"stage {name!r} registered twice")
    REGISTRY[name] = StageSpec(name, kind, options, build, offload)


def stage(name: str, kind: StageKind, options: type[StageOptions],
          offload: bool = False) -> Callable[[Build], Build]:
    """:func:`register` as a decorator of the build callable (a stage class taking its options,
    or a function), which it returns unchanged::

        @stage("detect.shouting", "detector", ShoutingOptions)
        class Shouting(TextDetector): ...
    """
    def decorate(build: Build) -> Build:
        register(name, kind, options, build, offload)
        return build
    return decorate


class StagePluginError(ValueError):
    """An installed stage plugin could not be loaded (a config error, reported in one line)."""


def load_plugins() -> None:
    """Import every stage module that an installed distribution declares under
    :data:`ENTRY_POINT_GROUP`. Loading one twice is harmless (Python imports a module once).
    A plugin that fails to load is an error naming it: a config naming its stages could not run."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:  # noqa: BLE001 - any failure is reported with the plugin's name
            raise StagePluginError(f"stage plugin {entry.name!r} ({entry.value}, entry point group "
                              f"{ENTRY_POINT_GROUP!r}) failed to load: "
                              f"{type(err).__name__}: {err}") from err
