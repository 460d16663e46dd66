"""Config validation: errors name the key path; check-config exits non-zero with that message."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bastion.config import Config, ConfigError, load_config, parse_config, with_overrides


def check_config(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "bastion.yaml"
    path.write_text(textwrap.dedent(text))
    return subprocess.run([sys.executable, "-m", "bastion", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_defaults_are_pass_through_and_secure():
    config = parse_config({})
    assert config.models == {}
    assert config.admin.startswith("127.0.0.1:")
    assert config.upstream.target == "127.0.0.1:9001"


def test_full_example_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""
        listen: 127.0.0.1:8001
        admin: 127.0.0.1:8002
        upstream: {target: 127.0.0.1:9001, timeout_s: 5}
        limits: {max_receive_message_bytes: 1048576, max_tensor_elements: 100000}
        models:
          fashion-mnist:
            mode: monitor
            inputs: {image: {datatype: FP32, shape: [-1, 1, 28, 28], kind: tensor}}
            pipeline: []
    """))
    config = load_config(path)
    assert config.models["fashion-mnist"].mode == "monitor"
    assert config.limits.max_tensor_elements == 100000


@pytest.mark.parametrize("text, fragment", [
    ("models: {m: {mode: block}}", "models.m.mode: Input should be 'enforce' or 'monitor'"),
    ("upstream: {target: nowhere}", "upstream.target: expected HOST:PORT"),
    ("upstream: {timeout_s: fast}", "upstream.timeout_s: Input should be a valid number"),
    ("listen: 1.2.3.4:99999", "listen: expected HOST:PORT"),
    ("models: {m: {inputs: {x: {datatype: FP8}}}}", "models.m.inputs.x.datatype: unknown datatype"),
    ("models: {m: {inputs: {x: {datatype: FP32, kind: text}}}}", "models.m.inputs.x: a text input"),
    ("models: {m: {mdoe: monitor}}", "models.m.mdoe: unknown key"),
    ("models: {m: {pipeline: [{a: {}, b: {}}]}}", "models.m.pipeline: stage 0 must be a mapping"),
    ("models: {m: {pipeline: [{detect.nothing: {}}]}}",
     "models.m.pipeline.0: unknown stage 'detect.nothing'"),
    ("- just\n- a list", "top level must be a mapping"),
    ("models: {m: [unclosed", "invalid YAML at line 1"),
])
def test_errors_name_the_key_path(tmp_path, text, fragment):
    path = tmp_path / "bastion.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)
    assert str(err.value).startswith(str(path))


def test_check_config_cli_exits_non_zero_with_the_message(tmp_path):
    result = check_config(tmp_path, "models: {m: {mode: block}}")
    assert result.returncode == 1
    assert "models.m.mode: Input should be 'enforce' or 'monitor'" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_ok(tmp_path):
    result = check_config(tmp_path, "models: {m: {mode: monitor}}")
    assert result.returncode == 0 and "OK" in result.stdout


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_cli_flags_override_file():
    config = with_overrides(Config(), listen="127.0.0.1:1", upstream="127.0.0.1:2")
    assert config.listen == "127.0.0.1:1" and config.upstream.target == "127.0.0.1:2"
    with pytest.raises(ConfigError, match="command line: upstream.target"):
        with_overrides(Config(), upstream="bad")


@pytest.mark.parametrize("model, fragment", [
    # a stage wired to an input whose datatype it does not accept
    ({"inputs": {"image": {"datatype": "FP32"}}, "pipeline": [
        {"sanitize.unicode": {"inputs": ["image"]}}]},
     "models.m.pipeline.0.sanitize.unicode: input 'image' is FP32, but the stage accepts BYTES"),
    ({"inputs": {"image": {"datatype": "FP32"}}, "pipeline": [{"detect.signatures": {}}]},
     "models.m.pipeline.0.detect.signatures: no input of this model fits the stage"),
    ({"inputs": {"prompt": {"kind": "text"}}, "pipeline": [
        {"transform.median": {"k": 3, "inputs": ["prompt"]}}]},
     "models.m.pipeline.0.transform.median: input 'prompt' is BYTES"),
    # a threshold of the wrong type
    ({"pipeline": [{"detect.signatures": {"threshold": "high"}}]},
     "models.m.pipeline.0.detect.signatures.threshold: Input should be a valid number"),
    # a stage naming an input the model does not have
    ({"inputs": {"prompt": {"kind": "text"}}, "pipeline": [
        {"detect.signatures": {"inputs": ["question"]}}]},
     "models.m.pipeline.0.detect.signatures.inputs: model has no input 'question'"),
    # stage-specific option errors
    ({"pipeline": [{"transform.bit_depth": {"bits": 0}}]}, "models.m.pipeline.0.transform.bit_depth"),
    ({"pipeline": [{"detect.signatures": {"colour": "red"}}]},
     "models.m.pipeline.0.detect.signatures.colour: unknown key"),
])
def test_check_config_rejects_miswired_stages(model, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config({"models": {"m": model}})
    assert fragment in str(err.value), str(err.value)


def test_check_config_rejects_a_missing_model_body(tmp_path):
    result = check_config(tmp_path, "models:\n  chat:\n")
    assert result.returncode == 1
    assert "models.chat: Input should be a valid dictionary" in result.stderr
