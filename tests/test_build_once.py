"""A config load builds each stage once: the sidecar's chain reuses the stages validation built
(issue 18, "work once"), and CLI overrides that leave the pipelines alone build nothing again."""
from __future__ import annotations

import numpy as np
import pytest

from bastion.config import parse_config, with_overrides
from bastion.core import registry
from bastion.core.registry import StageOptions
from bastion.detectors.base import TextDetector
from bastion.proxy.state import SidecarState

BUILDS: list[str] = []


class CountingOptions(StageOptions):
    tag: str = "a"


class Counting(TextDetector):
    def __init__(self, options: CountingOptions):
        BUILDS.append(options.tag)

    def score(self, batch):
        return np.zeros(len(batch))


@pytest.fixture(autouse=True)
def counting_stage():
    registry.register("test.counting", "detector", CountingOptions, Counting)
    BUILDS.clear()
    yield
    del registry.REGISTRY["test.counting"]


def config(tag: str = "a") -> dict:
    return {"models": {"chat": {"inputs": {"prompt": {"kind": "text"}},
                                "pipeline": [{"test.counting": {"tag": tag}}]}}}


def test_a_load_builds_each_stage_once_and_the_chain_uses_that_build():
    loaded = parse_config(config())
    state = SidecarState(loaded)
    assert BUILDS == ["a"]
    runner = state.current.pipelines["chat"].runners[0]
    assert runner.config is loaded.built_stages("chat")[0]


def test_overrides_reuse_the_stages_and_a_changed_pipeline_builds_again():
    loaded = parse_config(config())
    overridden = with_overrides(loaded, listen="127.0.0.1:0")
    SidecarState(overridden)
    assert BUILDS == ["a"]
    assert overridden.built_stages("chat")[0] is loaded.built_stages("chat")[0]
    changed = parse_config(config("b"), reuse=loaded)  # a different pipeline is built anew
    assert BUILDS == ["a", "b"]
    assert changed.built_stages("chat")[0].impl is not loaded.built_stages("chat")[0].impl


def test_a_model_replaced_after_validation_is_built_from_its_own_entries():
    loaded = parse_config(config())
    model = loaded.models["chat"].model_copy(update={"pipeline": [{"test.counting": {"tag": "c"}}]})
    edited = loaded.model_copy(update={"models": {"chat": model}})
    assert edited.built_stages("chat") is None  # the cached stages belong to the old model
    SidecarState(edited)
    assert BUILDS == ["a", "c"]
