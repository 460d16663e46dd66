"""Stage thresholds (for per-stage rates and the plots) and stage order: from a config's pipeline
or a sidecar's /metrics page."""
from __future__ import annotations

import re

from bastion.replay.outcome import EXIT_RUNTIME, ReplayError

_THRESHOLD_LINE = re.compile(r"^bastion_stage_threshold\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _runners(pipeline, response: bool = True) -> list:
    """The pipeline's request stages, then (``response``) its response stages."""
    if pipeline is None:
        return []
    return list(pipeline.runners) + (list(getattr(pipeline, "response_runners", []))
                                      if response else [])


def thresholds_of_pipeline(pipeline, response: bool = True) -> dict[str, float]:
    return {runner.config.stage_id: float(runner.config.common.threshold)
            for runner in _runners(pipeline, response)
            if runner.config.common.threshold is not None}


def thresholds_from_metrics(text: str, model: str) -> dict[str, float]:
    """``bastion_stage_threshold{model,stage}`` values of one model from a /metrics page."""
    out = {}
    for line in text.splitlines():
        match = _THRESHOLD_LINE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        if labels.get("model") == model and "stage" in labels:
            try:
                out[labels["stage"]] = float(match["value"])
            except ValueError:
                continue
    return out


def thresholds_from_admin(admin: str, model: str) -> dict[str, float]:
    import urllib.request
    url = admin if admin.startswith("http") else f"http://{admin}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=10) as reply:
            return thresholds_from_metrics(reply.read().decode("utf-8", "replace"), model)
    except OSError as err:
        raise ReplayError(f"bastion replay: cannot read {url}/metrics: {err}",
                          EXIT_RUNTIME) from None


def pipeline_of_config(config, model: str):
    """The model's pipeline built from ``config`` (None if the model is not configured)."""
    from bastion.proxy.pipeline import build_pipeline
    if model not in config.models:
        return None
    return build_pipeline(model, config.models[model])


def stage_ids(pipeline, response: bool = True) -> list[str]:
    return [runner.config.stage_id for runner in _runners(pipeline, response)]
