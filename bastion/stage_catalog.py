"""Every stage a config can name: Bastion's own stage modules and installed plugins.

Kept above transforms and detectors (the stage core, :mod:`bastion.core.registry`, knows no
stage): the config and the server ask :func:`registry`, which imports the stage modules on first
use, so importing the config stays light until a pipeline is validated.
"""
from __future__ import annotations

import importlib

from bastion.core.registry import REGISTRY, StageSpec, load_plugins

# Modules whose import registers stages (listed, not discovered, so the built-in set is explicit;
# other packages add theirs through the `bastion.stages` entry-point group).
BUILTIN_STAGE_MODULES = (
    "bastion.transforms.text",
    "bastion.transforms.image",
    "bastion.transforms.validate",
    "bastion.detectors.signatures",
    "bastion.detectors.fault",
    "bastion.detectors.squeeze",
    "bastion.detectors.smoothing",
    "bastion.detectors.upstream_features",
    "bastion.detectors.feature_ensemble",
    "bastion.detectors.perplexity",
    "bastion.detectors.anomaly",
    "bastion.detectors.embedding",
    "bastion.detectors.attack_library",
    "bastion.detectors.classifier",
    "bastion.detectors.ngram",
)

_loaded = False


def registry() -> dict[str, StageSpec]:
    """Stage name -> spec, every built-in stage and plugin stage loaded."""
    global _loaded
    if not _loaded:
        for module in BUILTIN_STAGE_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module:  # a stage module's own dependency is missing: say so
                    raise
        load_plugins()
        _loaded = True
    return REGISTRY
