"""One pipeline entry of the config -> a validated, built stage (:class:`StageConfig`).

The options every stage takes (:class:`CommonOptions`), the stage's own options, its threshold
file, the file paths in its options, and whether it fits the model's declared inputs
(:class:`InputSpec`). The config schema validates with this and the server builds its pipelines
with it, so it sits above the stages and below both: it imports neither the config nor the
server.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bastion import stage_catalog
from bastion.core.registry import StageSpec
from bastion.protos.codec import check_datatype


class InputSpec(BaseModel):
    """What the sidecar knows about one model input; stages check they fit it."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    datatype: str | None = None
    shape: list[int] | None = None
    # `text` marks a BYTES input holding UTF-8 prompts; `tensor` a numeric array.
    kind: Literal["text", "tensor"] | None = None

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str | None) -> str | None:
        return check_datatype(value)

    @model_validator(mode="after")
    def _kind_matches(self) -> "InputSpec":
        if self.kind == "text" and self.datatype not in (None, "BYTES"):
            raise ValueError("a text input must have datatype BYTES")
        return self


# Options every stage takes, handled here rather than by the stage itself.
COMMON_KEYS = ("id", "inputs", "threshold", "threshold_file", "action", "on_error", "on_overload",
               "budget_ms", "shadow", "enforce_percent")


class CommonOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$")
    inputs: list[str] | None = None
    threshold: float | None = None
    # A file `bastion calibrate` wrote ({"threshold": ...}); used when `threshold` is not set.
    # A detector with an `action` and neither option reads DEFAULT_THRESHOLD_FILE.
    threshold_file: str | None = None
    action: Literal["flag", "block", "throttle"] | None = None
    on_error: Literal["open", "closed"] = "open"
    # The stage's model is at capacity (its queue is full): `shed` refuses the request with
    # RESOURCE_EXHAUSTED and retry-after-ms (enforce mode; monitor mode skips the stage), `error`
    # hands it to on_error (open: the request goes on without this stage; closed: blocked).
    on_overload: Literal["shed", "error"] = "shed"
    budget_ms: float | None = Field(None, gt=0)
    # A shadow stage runs and annotates but never acts: the per-stage form of monitor mode.
    shadow: bool = False
    # Canary: the stage acts for this share of clients (sticky by client identity,
    # proxy/canary.py) and runs in shadow for the rest; None: for every client.
    enforce_percent: float | None = Field(None, ge=0, le=100)


# Where a detector with an action but no threshold looks for its threshold (relative to the
# config file's folder), and where `bastion calibrate` writes it: no config edit after calibrating.
DEFAULT_THRESHOLD_FILE = "thresholds/{model}.{stage}.json"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")  # builtin:tiny-lm, not a path


@dataclasses.dataclass(frozen=True)
class StageConfig:
    kind_name: str          # registry name, e.g. "sanitize.unicode"
    stage_id: str           # name in annotations and metrics (defaults to kind_name)
    common: CommonOptions
    spec: StageSpec
    impl: Any               # Transform | Detector
    # Where common.threshold came from: "config" (a number in the config), "file" (its
    # threshold_file), "missing" (threshold_file not written yet: the stage is uncalibrated and
    # never acts; only `bastion calibrate` loads such a config) or "none".
    threshold_source: Literal["config", "file", "missing", "none"] = "none"


#: ``builtin:profiles/...`` in these options names a file shipped inside the bastion package
#: (the shipped profiles' thresholds and states), so a profile works from any folder, a ConfigMap
#: included, right after ``pip install``. (``model``/``encoder`` options give ``builtin:`` their
#: own meaning: a bundled model.)
PACKAGE_FILE_OPTIONS = ("threshold_file", "state")
PACKAGE_PREFIX = "builtin:"


def package_file(value: str) -> pathlib.Path:
    """``builtin:REL`` -> the file REL inside the installed bastion package."""
    import bastion
    relative = pathlib.PurePosixPath(value.removeprefix(PACKAGE_PREFIX))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"{value!r}: a builtin: file is a relative path inside the package")
    return pathlib.Path(bastion.__file__).resolve().parent.joinpath(*relative.parts)


def resolve_paths(model_name: str, entries: list[dict], base_dir: pathlib.Path | None
                  ) -> list[dict]:
    """The pipeline with relative file options resolved against ``base_dir`` (the config file's
    folder; None keeps them relative to the working directory) and each acting detector without
    a threshold given its DEFAULT_THRESHOLD_FILE. Entries that do not parse are left for
    :func:`parse_stage` to report."""
    registry = stage_catalog.registry()
    resolved = []
    for entry in entries:
        (name, options), = entry.items()
        spec = registry.get(name)
        if spec is None or not isinstance(options, (dict, type(None))):
            resolved.append(entry)
            continue
        options = dict(options or {})
        if (spec.kind == "detector" and options.get("action") is not None
                and options.get("threshold") is None and options.get("threshold_file") is None
                and isinstance(options.get("id", name), str)):
            options["threshold_file"] = DEFAULT_THRESHOLD_FILE.format(
                model=model_name, stage=options.get("id", name))
        for key in ("threshold_file", *spec.options.path_options):
            value = options.get(key)
            if key in PACKAGE_FILE_OPTIONS and isinstance(value, str) and \
                    value.startswith(PACKAGE_PREFIX):
                try:
                    options[key] = str(package_file(value))
                except ValueError:
                    pass  # left as written: loading it names the bad path
                continue
            if (base_dir is not None and isinstance(value, str) and value
                    and not os.path.isabs(value) and not _SCHEME.match(value)):
                options[key] = os.path.normpath(base_dir / value)
        resolved.append({name: options})
    return resolved


def calibrate_command(model_name: str, config_path: str | None = None) -> str:
    return f"bastion calibrate -c {config_path or 'CONFIG'} --model {model_name}"


def parse_stage(entry: dict, inputs: Mapping[str, InputSpec], path: str, *,
                allow_uncalibrated: bool = False,
                hint: str = "bastion calibrate -c CONFIG --model MODEL") -> StageConfig:
    """Validate one pipeline entry and build its stage; ``inputs`` are the model's declared
    inputs (``ModelConfig.inputs``), which the stage must fit. Errors are ValueError naming
    ``path`` and the key.

    A ``threshold_file`` that does not exist is an error naming the calibrate command
    (``hint``) unless ``allow_uncalibrated`` (what `bastion calibrate` loads with)."""
    (name, options), = entry.items()
    options = dict(options or {})
    registry = stage_catalog.registry()
    spec = registry.get(name)
    if spec is None:
        raise ValueError(f"{path}: unknown stage {name!r} (known stages: "
                         f"{', '.join(sorted(registry)) or 'none'})")
    common_data = {k: options.pop(k) for k in COMMON_KEYS if k in options}
    try:
        common = CommonOptions.model_validate(common_data)
        specific = spec.options.model_validate(options)
        impl = spec.build(specific)
    except ValidationError as err:
        item = err.errors()[0]
        key = ".".join(str(p) for p in item["loc"])
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        message = message.removeprefix("Value error, ")
        raise ValueError(f"{path}.{name}{'.' + key if key else ''}: {message}") from None
    except (TypeError, ValueError, ImportError, OSError) as err:
        raise ValueError(f"{path}.{name}: {err}") from None
    source = "config" if common.threshold is not None else "none"
    if common.threshold is None and common.threshold_file is not None:
        if not pathlib.Path(common.threshold_file).exists():
            if not allow_uncalibrated:
                raise ValueError(f"{path}.{name}.threshold_file: {common.threshold_file} does "
                                 f"not exist: the stage is not calibrated yet; run `{hint}` to "
                                 "create it")
            source = "missing"
        else:
            common = common.model_copy(update={"threshold": _read_threshold(
                common.threshold_file, f"{path}.{name}")})
            source = "file"
    if common.action is None and common.threshold_file is not None:
        common = common.model_copy(update={"action": "block"})
    if common.action is None and common.threshold is not None:
        common = common.model_copy(update={"action": "block"})
    if (spec.kind == "detector" and common.threshold is None and common.action is not None
            and source != "missing"):
        raise ValueError(f"{path}.{name}.action: needs a threshold to act on")
    _check_inputs(name, impl, common, inputs, path)
    return StageConfig(name, common.id or name, common, spec, impl, source)


def _read_threshold(path: str, where: str) -> float:
    try:
        data = json.loads(pathlib.Path(path).read_text())
        return float(data["threshold"])
    except OSError as err:
        raise ValueError(f"{where}.threshold_file: cannot read {path}: {err.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{where}.threshold_file: {path} has no numeric `threshold` (write it "
                         "with `bastion calibrate`)") from None


def _check_inputs(name: str, impl, common: CommonOptions, inputs: Mapping[str, InputSpec],
                  path: str) -> None:
    accepts = impl.accepts
    declared = {input_name: _declared_datatype(spec) for input_name, spec in inputs.items()}
    if common.inputs is not None:
        for input_name in common.inputs:
            if declared and input_name not in declared:
                raise ValueError(f"{path}.{name}.inputs: model has no input {input_name!r} "
                                 f"(declared: {', '.join(declared)})")
            datatype = declared.get(input_name)
            if datatype is not None and datatype not in accepts:
                raise ValueError(f"{path}.{name}: input {input_name!r} is {datatype}, but the stage "
                                 f"accepts {_describe(accepts)}")
    elif declared and not any(d is None or d in accepts for d in declared.values()):
        raise ValueError(f"{path}.{name}: no input of this model fits the stage (it accepts "
                         f"{_describe(accepts)}; inputs: "
                         f"{', '.join(f'{k} {v}' for k, v in declared.items())})")


def _declared_datatype(spec) -> str | None:
    if spec.datatype:
        return spec.datatype
    return "BYTES" if spec.kind == "text" else None


def _describe(accepts: frozenset[str]) -> str:
    return "BYTES (text)" if accepts == {"BYTES"} else ", ".join(sorted(accepts))


def check_one_key_entries(entries: list[dict], what: str) -> list[dict]:
    """Pipeline-style entries: each a mapping with exactly one key, the stage name."""
    for index, entry in enumerate(entries):
        if len(entry) != 1:
            raise ValueError(f"{what} {index} must be a mapping with exactly one key (the stage "
                             f"name), got {len(entry)} keys")
    return entries
