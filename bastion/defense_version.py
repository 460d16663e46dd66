"""The defense version: one digest that says exactly which defense judged a request.

It covers the effective config (after profiles are expanded, paths resolved and defaults
filled in: two files that differ only in comments, key order or spelled-out defaults have the
same version) and the content of every file the built stages read: the ones their options name
(``threshold_file``, ``state``, ``library``, ``rules``, ``model``, ``encoder``; a folder is every
file in it) and the ones they load on their own (``Stage.loaded_files``: a bundled model, the
default rule file). A changed threshold file, a refitted state or a retrained model changes the
version; touching a file without changing it does not.

Paths inside the installed bastion package are written ``builtin:...``, so replicas running
the same image and config report the same version wherever the package is installed. File
digests are cached by (path, mtime, size), so a reload rehashes only what changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

PREFIX = "sha256:"
SHORT = 16  # hex digits shown: 64 bits, plenty to tell a fleet's versions apart
_PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parent) + "/"  # this module is in bastion/


@dataclasses.dataclass(frozen=True)
class DefenseVersion:
    digest: str                  # "sha256:" + 16 hex digits
    files: dict[str, str]        # portable path -> sha256 of its content

    def __str__(self) -> str:
        return self.digest


def portable(path: str) -> str:
    """A path as it appears in the version: package files as ``builtin:REL``."""
    return "builtin:" + path[len(_PACKAGE_ROOT):] if path.startswith(_PACKAGE_ROOT) else path


def file_digest(path: pathlib.Path) -> str:
    """sha256 of a file's content, cached by (path, mtime, size): the encoder's own digest,
    so a model the stage already hashed at load is not read again."""
    from bastion.detectors.encoder import sha256_file
    return sha256_file(path)


def _files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return []


def stage_files(entry: dict, stage) -> list[pathlib.Path]:
    """The files one built stage read: those its options name, and its own ``loaded_files``."""
    (_, options), = entry.items()
    options = options or {}
    paths = []
    for key in ("threshold_file", *stage.spec.options.path_options):
        value = options.get(key)
        if isinstance(value, str) and value and not value.startswith("builtin:"):
            paths.extend(_files(pathlib.Path(value)))
    for path in getattr(stage.impl, "loaded_files", ()) or ():
        paths.extend(_files(pathlib.Path(path)))
    return paths


def canonical_entry(entry: dict, stage) -> dict:
    """A pipeline entry with every option validated and defaults filled in, so a config that
    spells out a default and one that leaves it out are the same defense."""
    from bastion.stage_config import COMMON_KEYS, CommonOptions
    (name, options), = entry.items()
    options = dict(options or {})
    common = {k: options.pop(k) for k in COMMON_KEYS if k in options}
    return {name: {**CommonOptions.model_validate(common).model_dump(mode="json"),
                   **stage.spec.options.model_validate(options).model_dump(mode="json")}}


def defense_version(config) -> DefenseVersion:
    """The version of ``config`` (a validated :class:`bastion.config.Config` whose stages were
    built, so the files they read are known)."""
    data = config.model_dump(mode="json")
    for name, model in config.models.items():
        stages = config.built_stages(name)
        if stages is not None and len(stages) == len(model.pipeline):
            data["models"][name]["pipeline"] = [canonical_entry(entry, stage)
                                                for entry, stage in zip(model.pipeline, stages)]
    body = json.dumps(data, sort_keys=True, separators=(",", ":"))
    body = body.replace(_PACKAGE_ROOT, "builtin:")
    files: dict[str, str] = {}
    for name, model in config.models.items():
        stages = config.built_stages(name) or []
        for entry, stage in zip(model.pipeline, stages):
            for path in stage_files(entry, stage):
                resolved = path.resolve()
                files[portable(str(resolved))] = file_digest(resolved)
    digest = hashlib.sha256(body.encode())
    for path, content in sorted(files.items()):
        digest.update(f"\n{path}\0{content}".encode())
    return DefenseVersion(PREFIX + digest.hexdigest()[:SHORT], files)
