"""Shipped defense profiles: complete, calibrated pipelines a model can name.

A profile is a YAML file in ``bastion/profiles/`` (``deploy/profiles/`` in the repository
points at the same files) holding one model entry, ready to serve as it is::

    bastion serve -c deploy/profiles/llm-prompt.yaml --upstream 127.0.0.1:9001

or to be named by a model of any config, which then takes the profile's ``mode``, ``inputs``
and ``pipeline`` unless it sets them itself::

    models:
      my-llm:
        profile: llm-prompt      # keys written here override the profile's

Every file a profile loads is named ``builtin:...`` (inside the installed package), so a
profile works right after ``pip install`` from any folder, a Kubernetes ConfigMap included.
"""
from __future__ import annotations

import pathlib
from typing import Any

import yaml

PROFILE_DIR = pathlib.Path(__file__).resolve().parent / "profiles"


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_path(name: str) -> pathlib.Path:
    path = PROFILE_DIR / f"{name}.yaml"
    if "/" in name or name.startswith(".") or not path.is_file():
        raise ValueError(f"unknown profile {name!r} (shipped: {', '.join(available())})")
    return path


def profile_model(name: str) -> dict[str, Any]:
    """The one model entry of profile ``name`` (mode, inputs, pipeline, ...)."""
    data = yaml.safe_load(profile_path(name).read_text()) or {}
    models = data.get("models") or {}
    if len(models) != 1:
        raise ValueError(f"profile {name!r} must hold exactly one model, has {len(models)}")
    return dict(next(iter(models.values())))


def expand_profiles(data: Any) -> tuple[Any, list[str]]:
    """``data`` with every ``models.NAME.profile`` replaced by the profile's keys (the model's
    own keys win), and the problems found (each naming its key path)."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return data, []
    problems, models = [], {}
    for model_name, entry in data["models"].items():
        if isinstance(entry, dict) and "profile" in entry:
            entry = dict(entry)
            name = entry.pop("profile")
            try:
                base = profile_model(str(name))
            except (ValueError, yaml.YAMLError) as err:
                problems.append(f"models.{model_name}.profile: {err}")
                models[model_name] = entry
                continue
            entry = {**base, **entry}
        models[model_name] = entry
    return {**data, "models": models}, problems
