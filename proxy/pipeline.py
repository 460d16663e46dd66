"""Per-model filter chain and the one stage wrapper.

Each model's ``pipeline`` in config is an ordered list of stages (Envoy-style filter chain), run
on the decoded request. Every stage, whatever it does, is run by :class:`StageRunner`, which
gives it timing, a time budget, ``on_error: open|closed``, ``on_overload: shed|error`` (a model
at capacity, detectors/batcher.py), metrics and a span, and turns its score into a decision with
the stage's threshold and action. The policy (:mod:`bastion.proxy.policy`)
folds the decisions into one verdict.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import re
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion import stage_catalog
from bastion.core.registry import StageSpec
from bastion.detectors.batcher import Overloaded
from bastion.protos.codec import TensorError, as_bytes_array
from bastion.proxy.policy import ACTIONS, Decision
from bastion.transforms.base import InputRejected, Transform, TransformContext

if TYPE_CHECKING:
    from bastion.config import Config, ModelConfig
    from bastion.proxy.metrics import Metrics

tracer = trace.get_tracer("bastion.pipeline")

# Options every stage takes, handled here rather than by the stage itself.
COMMON_KEYS = ("id", "inputs", "threshold", "threshold_file", "action", "on_error", "on_overload",
               "budget_ms", "shadow")


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


@dataclasses.dataclass
class RequestContext:
    """What one inference request carries through its model's pipeline."""
    request_id: str
    model_name: str
    model_version: str
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    # Inputs whose data lives out of band (Triton shared memory): present by name, not inspectable.
    out_of_band: list[str] = dataclasses.field(default_factory=list)
    invalid_utf8: str = "reject"
    changed: bool = False
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    decisions: list[Decision] = dataclasses.field(default_factory=list)
    # The text a detector scored highest so far, for the audit excerpt (never logged raw).
    suspicious_text: str | None = None
    _suspicious_score: float = 0.0
    _texts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    _texts_changed: set[str] = dataclasses.field(default_factory=set)

    def texts(self, name: str) -> np.ndarray:
        """The BYTES input ``name`` decoded as UTF-8 str, once per request."""
        cached = self._texts.get(name)
        if cached is None:
            raw = self.inputs[name]
            cached = np.empty(raw.shape, dtype=object)
            flat_in, flat_out = raw.reshape(-1), cached.reshape(-1)
            for index, item in enumerate(flat_in):
                try:
                    flat_out[index] = item.decode("utf-8")
                except UnicodeDecodeError:
                    if self.invalid_utf8 != "replace":
                        raise TensorError(f"input '{name}': element {index} is not valid "
                                          "UTF-8") from None
                    flat_out[index] = item.decode("utf-8", "replace")
                    self._texts_changed.add(name)  # forward the repaired text
                    self.changed = True
            self._texts[name] = cached
        return cached

    def set_texts(self, name: str, texts: np.ndarray) -> None:
        self._texts[name] = texts
        self._texts_changed.add(name)
        self.changed = True

    def set_tensor(self, name: str, array: np.ndarray) -> None:
        self.inputs[name] = array
        self.changed = True

    def finish(self) -> None:
        """Write changed texts back into the BYTES inputs before re-encoding."""
        for name in self._texts_changed:
            texts = self._texts[name]
            self.inputs[name] = as_bytes_array(texts.reshape(-1), texts.shape)
        self._texts_changed.clear()


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


def parse_stage(entry: dict, model: ModelConfig, path: str, *, allow_uncalibrated: bool = False,
                hint: str = "bastion calibrate -c CONFIG --model MODEL") -> StageConfig:
    """Validate one pipeline entry; errors are ValueError naming ``path`` and the key.

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
    _check_inputs(name, impl, common, model, path)
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


def _check_inputs(name: str, impl, common: CommonOptions, model: ModelConfig, path: str) -> None:
    accepts = impl.accepts
    declared = {input_name: _declared_datatype(spec) for input_name, spec in model.inputs.items()}
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


class StageShed(Exception):
    """A stage whose model is at capacity sheds the request (``on_overload: shed``)."""

    def __init__(self, stage_id: str, cause: Overloaded):
        super().__init__(f"stage {stage_id} is at capacity ({cause}); retry later")
        self.stage_id = stage_id


class StageRunner:
    """Runs one configured stage on a request: the one place for timing, budget, errors,
    overload, metrics and spans."""

    def __init__(self, model_name: str, config: StageConfig, metrics: Metrics | None,
                 enforce: bool = True):
        self.model_name = model_name
        self.config = config
        self.metrics = metrics
        # Monitor mode never refuses: there an overloaded stage is skipped (fail open).
        self.may_shed = enforce and config.common.on_overload == "shed" and not config.common.shadow
        self.is_transform = isinstance(config.impl, Transform)
        self.kind = config.spec.kind
        self.is_text = config.impl.accepts == {"BYTES"}

    def _targets(self, ctx: RequestContext) -> list[str]:
        wanted = self.config.common.inputs
        names = wanted if wanted is not None else list(ctx.inputs)
        accepts = self.config.impl.accepts
        return [n for n in names if n in ctx.inputs and ctx.datatypes.get(n) in accepts]

    def _run_sync(self, ctx: RequestContext, targets: list[str]) -> tuple[float, list[str], dict]:
        """Returns (score, reasons, replacements); replacements are applied by the caller so a
        stage that fails half-way never leaves a half-transformed request."""
        impl = self.config.impl
        reasons: list[str] = []
        if self.is_transform:
            replacements, total = {}, 0
            for name in targets:
                value = ctx.texts(name) if self.is_text else ctx.inputs[name]
                result = impl.apply(value, TransformContext(ctx.request_id, name, ctx.datatypes[name]))
                if result.changed:
                    replacements[name] = result.array
                    total += result.changed
                    reasons.extend(f"{self.config.stage_id}:{k}" for k in sorted(result.counts))
            return float(total), reasons, replacements
        items = self._items(ctx, targets)
        if not items:
            return 0.0, [], {}
        return self._summarize(items, impl.score(items), ctx)

    def _items(self, ctx: RequestContext, targets: list[str]) -> list:
        items = []
        for name in targets:
            values = ctx.texts(name) if self.is_text else ctx.inputs[name]
            items.extend(list(values.reshape(-1)) if self.is_text else [values])
        return items

    def _summarize(self, items: list, scores, ctx: RequestContext | None = None
                   ) -> tuple[float, list[str], dict]:
        scores = np.asarray(scores, dtype=np.float64)
        worst = int(np.argmax(scores))
        if ctx is not None and isinstance(items[worst], str) and scores[worst] > ctx._suspicious_score:
            ctx.suspicious_text, ctx._suspicious_score = items[worst], float(scores[worst])
        reasons = self.config.impl.reasons(items[worst]) if scores[worst] > 0 else []
        return float(scores[worst]), reasons, {}

    async def _run_async(self, ctx: RequestContext, targets: list[str]):
        items = self._items(ctx, targets)
        if not items:
            return 0.0, [], {}
        return self._summarize(items, await self.config.impl.ascore(items), ctx)

    def _failed(self, error: str, span) -> Decision:
        """A stage that raised or ran over budget: on_error decides (closed blocks)."""
        span.set_attribute("bastion.stage.error", error)
        common = self.config.common
        if common.on_error == "closed":
            return Decision(self.config.stage_id, "block", None, [f"stage_{error}"],
                            shadow=common.shadow)
        return Decision(self.config.stage_id, "allow", None, [f"stage_{error}:fail_open"],
                        shadow=common.shadow)

    async def run(self, ctx: RequestContext) -> Decision | None:
        common = self.config.common
        stage_id = self.config.stage_id
        targets = self._targets(ctx)
        if not targets:
            return None
        started = time.perf_counter()
        with tracer.start_as_current_span(f"bastion.stage {stage_id}") as span:
            error = None
            try:
                timeout = common.budget_ms / 1000 if common.budget_ms else None
                if getattr(self.config.impl, "is_async", False):
                    work = self._run_async(ctx, targets)
                    score, reasons, replacements = await asyncio.wait_for(work, timeout)
                elif self.config.spec.offload:
                    work = asyncio.to_thread(self._run_sync, ctx, targets)
                    score, reasons, replacements = await asyncio.wait_for(work, timeout)
                else:
                    score, reasons, replacements = self._run_sync(ctx, targets)
                elapsed = time.perf_counter() - started
                if common.budget_ms and elapsed * 1000 > common.budget_ms:
                    error = "budget_exceeded"
            except (InputRejected, TensorError):
                raise  # a rule break is a verdict on the request, not a stage failure
            except asyncio.TimeoutError:
                error = "budget_exceeded"
            except Overloaded as exc:
                if self.may_shed:
                    span.set_attribute("bastion.stage.error", "shed")
                    if self.metrics is not None:
                        self.metrics.observe_shed(self.model_name, stage_id)
                    raise StageShed(stage_id, exc) from None
                error = "overloaded"
            except Exception as exc:  # noqa: BLE001 - any stage bug is handled by on_error
                error = "error"
                span.record_exception(exc)
            elapsed = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.observe_stage(self.model_name, stage_id, elapsed, error)
            if error is not None:
                return self._failed(error, span)
            for name, value in replacements.items():
                ctx.set_texts(name, value) if self.is_text else ctx.set_tensor(name, value)
            ctx.scores[stage_id] = score
            if self.metrics is not None:
                self.metrics.observe_score(self.model_name, stage_id, score)
            span.set_attribute("bastion.stage.score", score)
            acted = common.threshold is not None and score >= common.threshold
            if acted:
                action = common.action or "block"
            elif self.is_transform and replacements:
                action = "transform"
            else:
                action = "allow"
            if action != "allow":
                span.set_attribute("bastion.stage.action", action)
            return Decision(stage_id, action, score, reasons if action != "allow" else [],
                            threshold=common.threshold, shadow=common.shadow)


class ResponseRunner(StageRunner):
    """Runs a response stage: ``prepare`` on the request about to be forwarded, ``finish`` on
    the upstream's answer, with the same timing, budget, on_error, metrics and span as any stage."""

    def prepare(self, request, ctx: RequestContext):
        """(ok, state): a stage that fails here follows on_error at finish time."""
        try:
            return True, self.config.impl.prepare(request, ctx.inputs, ctx.request_id)
        except (InputRejected, TensorError):
            raise
        except Exception:  # noqa: BLE001
            return False, None

    async def finish(self, prepared, response, call_upstream) -> tuple[Decision, dict, int]:
        common = self.config.common
        stage_id = self.config.stage_id
        ok, state = prepared
        started = time.perf_counter()
        with tracer.start_as_current_span(f"bastion.stage {stage_id}") as span:
            error, result = None, None
            if not ok:
                error = "error"
            else:
                try:
                    timeout = common.budget_ms / 1000 if common.budget_ms else None
                    result = await asyncio.wait_for(
                        self.config.impl.on_response(state, response, call_upstream), timeout)
                except asyncio.TimeoutError:
                    error = "budget_exceeded"
                except Exception as exc:  # noqa: BLE001 - handled by on_error
                    error = "error"
                    span.record_exception(exc)
            elapsed = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.observe_stage(self.model_name, stage_id, elapsed, error)
            if error is not None:
                return self._failed(error, span), {}, 0
            if self.metrics is not None:
                self.metrics.observe_score(self.model_name, stage_id, result.score)
                if result.extra_items:
                    self.metrics.observe_extra_upstream(self.model_name, stage_id,
                                                        result.extra_items)
            span.set_attribute("bastion.stage.score", result.score)
            if result.refusal is not None:
                status, reason = result.refusal
                decision = Decision(stage_id, "block", result.score, [reason] + result.reasons,
                                    threshold=common.threshold, shadow=common.shadow,
                                    status=status)
            elif result.flag is not None:
                decision = Decision(stage_id, "flag", result.score, [result.flag] + result.reasons,
                                    threshold=common.threshold, shadow=common.shadow)
            elif common.threshold is not None and result.score >= common.threshold:
                decision = Decision(stage_id, common.action or "block", result.score,
                                    result.reasons, threshold=common.threshold,
                                    shadow=common.shadow)
            else:
                decision = Decision(stage_id, "allow", result.score, [],
                                    threshold=common.threshold, shadow=common.shadow)
            return decision, result.parameters, result.extra_items


class Pipeline:
    """An ordered chain of stages for one model: request stages, then response stages."""

    def __init__(self, model_name: str, model: ModelConfig, runners: list[StageRunner],
                 response_runners: list[ResponseRunner] | None = None):
        self.model_name = model_name
        self.model = model
        self.runners = runners
        self.response_runners = response_runners or []

    def __bool__(self) -> bool:
        return bool(self.runners or self.response_runners)

    async def run(self, ctx: RequestContext, stop_on_block: bool) -> RequestContext:
        for runner in self.runners:
            decision = await runner.run(ctx)
            if decision is None:
                continue
            ctx.decisions.append(decision)
            if stop_on_block and decision.action == "block" and not decision.shadow:
                break  # nothing later can change a block; spare the work
        ctx.finish()
        return ctx


def build_pipeline(model_name: str, model: ModelConfig, metrics: Metrics | None = None, *,
                   allow_uncalibrated: bool = False) -> Pipeline:
    runners, response_runners = [], []
    for index, entry in enumerate(model.pipeline):
        config = parse_stage(entry, model, f"models.{model_name}.pipeline.{index}",
                             allow_uncalibrated=allow_uncalibrated,
                             hint=calibrate_command(model_name))
        if config.spec.kind == "response":
            response_runners.append(ResponseRunner(model_name, config, metrics))
        elif response_runners:
            raise ValueError(f"models.{model_name}.pipeline.{index}: request stages must come "
                             "before response stages")
        else:
            runners.append(StageRunner(model_name, config, metrics,
                                       enforce=model.mode == "enforce"))
    return Pipeline(model_name, model, runners, response_runners)


def validate_pipelines(config: Config, *, allow_uncalibrated: bool = False,
                       config_path: str | None = None) -> list[str]:
    """Problems with the configured pipelines, each naming its key path."""
    problems = []
    for model_name, model in config.models.items():
        ids: dict[str, int] = {}
        seen_response = False
        for index, entry in enumerate(model.pipeline):
            path = f"models.{model_name}.pipeline.{index}"
            try:
                stage = parse_stage(entry, model, path, allow_uncalibrated=allow_uncalibrated,
                                    hint=calibrate_command(model_name, config_path))
            except ValueError as err:
                problems.append(str(err))
                continue
            if stage.spec.kind == "response":
                seen_response = True
            elif seen_response:
                problems.append(f"{path}: request stages must come before response stages")
            if stage.stage_id in ids:
                problems.append(f"{path}: stage id {stage.stage_id!r} is already used by stage "
                                f"{ids[stage.stage_id]}; give one an `id`")
            ids[stage.stage_id] = index
    return problems


__all__ = ["ACTIONS", "DEFAULT_THRESHOLD_FILE", "Pipeline", "RequestContext", "StageRunner",
           "build_pipeline", "calibrate_command", "parse_stage", "resolve_paths",
           "validate_pipelines"]
