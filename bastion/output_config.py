"""`models.NAME.output`: what the sidecar checks in the text a model generates.

A prompt injection that worked shows in the output (a leaked canary or system prompt, an
exfiltrated secret), not always in the input. With this section the sidecar scans the model's
BYTES output tensor (unary answers whole; ModelStreamInfer chunks incrementally, holding back
the last ``holdback_chars`` characters so a match split across chunks is caught before any of it
is released; detectors/output_scan.py) and redacts or stops.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bastion.detectors.output_match import Action as ScanAction
from bastion.detectors.output_scan import OutputScanner, build_matchers
from bastion.stage_config import InputSpec, check_one_key_entries, parse_stage

Action = Literal["redact", "stop", "off"]


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The BYTES output tensor that carries generated text (Triton's LLM backends: text_output).
    tensor: str = "text_output"
    # Strings the application plants in its system prompt; one in the output means an injection
    # made the model reveal its instructions (exact, case-insensitive).
    canaries: list[str] = []
    # Texts that must never come back, matched fuzzily by word shingles (e.g. the system prompt).
    secret_texts: list[str] = []
    # Share of a secret text's word shingles in a window of output that counts as a leak.
    leak_threshold: float = Field(0.6, gt=0, le=1)
    on_canary: Literal["stop", "redact"] = "stop"
    # API keys, tokens, private keys and high-entropy strings.
    secrets: Action = "redact"
    # E-mail addresses, phone numbers and Luhn-valid card numbers.
    pii: Action = "redact"
    pii_kinds: list[Literal["email", "phone", "card"]] = ["email", "phone", "card"]
    # Characters held back in a stream; None: the widest rule's span (the least that is safe).
    holdback_chars: int | None = Field(None, gt=0)
    # Text detector stages on the generated text, as pipeline entries (e.g. detect.signatures
    # with a threshold, or detect.classifier with its calibrated threshold_file): one scoring at
    # or above its threshold stops the answer. A stream scores each text about to be released
    # with the last `detector_context_chars` already released, so nothing unscored goes out
    # (each release costs one scoring per detector: pick cheap ones for long generations).
    detectors: list[dict[str, dict[str, Any] | None]] = []
    detector_context_chars: int = Field(256, ge=0)

    @field_validator("detectors")
    @classmethod
    def _one_key_per_detector(cls, entries: list[dict]) -> list[dict]:
        return check_one_key_entries(entries, "detector")

    @model_validator(mode="after")
    def _buildable(self) -> "OutputConfig":
        build_scanner(self)  # e.g. a hold-back shorter than a rule's span is refused here
        return self


def build_scanner(config: OutputConfig) -> OutputScanner:
    """The scanner for one model's output section (rules compiled once per config load)."""
    group = {"off": None, "redact": ScanAction.REDACT, "stop": ScanAction.STOP}
    matchers = build_matchers(canaries=config.canaries, secret_texts=config.secret_texts,
                              canary_action=ScanAction(config.on_canary),
                              secrets=group[config.secrets], pii=group[config.pii],
                              pii_kinds=config.pii_kinds, leak_threshold=config.leak_threshold)
    return OutputScanner(matchers, holdback_chars=config.holdback_chars)


#: What output detectors are told they read: one UTF-8 text, the generated text.
OUTPUT_INPUTS = {"generated": InputSpec(datatype="BYTES", kind="text")}


def parse_output_detectors(model_name: str, config: OutputConfig, **parse_options) -> list:
    """The output section's detectors as built stages (bastion.stage_config.StageConfig); a
    ValueError names the key path of the first problem. Each must be a detector with a
    threshold (in the config or its threshold_file)."""
    stages = []
    for index, entry in enumerate(config.detectors):
        path = f"models.{model_name}.output.detectors.{index}"
        stage = parse_stage(entry, OUTPUT_INPUTS, path, **parse_options)
        if stage.spec.kind != "detector":
            raise ValueError(f"{path}: {stage.kind_name} is a {stage.spec.kind} stage; output "
                             "detectors must be detectors")
        if stage.common.threshold is None and stage.threshold_source != "missing":
            raise ValueError(f"{path}.{stage.kind_name}: an output detector needs a threshold "
                             "(or a threshold_file)")
        stages.append(stage)
    return stages
