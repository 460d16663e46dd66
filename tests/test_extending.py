"""docs/extending.md's worked example, imported as it is and run through a pipeline from config."""
from __future__ import annotations

import asyncio
import importlib.util

import pytest

from bastion.config import parse_config
from bastion.core import registry
from bastion.protos import codec
from bastion.proxy.pipeline import RequestContext, build_pipeline
from tests.harness import REPO

EXAMPLE = REPO / "docs" / "examples" / "card_number_stage.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("card_number_stage", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the @stage decorator registers it
    yield module
    registry.REGISTRY.pop("example.card_number", None)


def run(pipeline, text: str):
    ctx = RequestContext("r", "my-llm", "", {"prompt": codec.as_bytes_array([text], (1, 1))},
                         {"prompt": "BYTES"})
    asyncio.run(pipeline.run(ctx, stop_on_block=True))
    return [(d.action, d.reasons) for d in ctx.decisions if d.stage == "example.card_number"]


def test_the_example_blocks_card_numbers_from_one_config_entry(example):
    config = parse_config({"models": {"my-llm": {
        "inputs": {"prompt": {"datatype": "BYTES", "kind": "text"}},
        "pipeline": [{"example.card_number": {"threshold": 1, "action": "block"}}]}}})
    pipeline = build_pipeline("my-llm", config.models["my-llm"])
    assert run(pipeline, "my card is 4111 1111 1111 1111, exp 12/29") == [
        ("block", ["pii:card_number"])]
    # Not Luhn-valid, or too short: a phone number, an order number.
    assert run(pipeline, "call +1 415 555 0100 about order 1234-5678-9012") == [("allow", [])]
    assert run(pipeline, "order 4111 1111 1111 1112 shipped") == [("allow", [])]


def test_the_example_rejects_an_unknown_option(example):
    from bastion.config import ConfigError
    with pytest.raises(ConfigError, match=r"example.card_number.min_digit: unknown key"):
        parse_config({"models": {"my-llm": {
            "inputs": {"prompt": {"kind": "text"}},
            "pipeline": [{"example.card_number": {"threshold": 1, "min_digit": 3}}]}}})
