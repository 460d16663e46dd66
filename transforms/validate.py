"""Tensor validation: datatype, shape, element cap, finiteness and value range of one input.

The ``validate.tensor`` stage changes nothing (counts ``{}``); a violation raises
:class:`InputRejected`, whose message names the input and the rule and carries no tensor data
beyond the rule's own bounds (``input 'image': value out of range [0, 1]``), so it is safe to
return to the client.

Rules run cheapest first: datatype, shape, element cap (metadata only), then finiteness and range
(one vectorised min and max over the tensor, no per-element Python). ``finite`` applies to float
datatypes only; ``min``/``max`` to numeric ones (a BYTES input with a range rule is rejected). With
``finite: false`` NaN is ignored by the range rule (±Inf is still compared).

Besides the configured stage, :class:`TensorSpec` + :func:`check` are a plain API for the proxy to
validate requests against a model's ModelMetadata learned at start-up
(:func:`specs_from_metadata`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import ml_dtypes
import numpy as np
from pydantic import Field, field_validator, model_validator

from bastion.core.registry import StageOptions, register
from bastion.protos.codec import check_datatype
from bastion.transforms.base import (NUMERIC_DATATYPES, TEXT_DATATYPES, InputRejected, Transform,
                                     TransformContext, TransformResult)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What one input must look like; ``None`` disables a rule. ``-1`` in ``shape``: any size."""
    datatype: str | None = None
    shape: tuple[int, ...] | None = None
    min: float | None = None
    max: float | None = None
    finite: bool = True
    max_elements: int | None = None

    def __post_init__(self):
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


def _fmt(value: float) -> str:
    return f"{value:g}"


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == ml_dtypes.bfloat16


def _shape_matches(shape: Sequence[int], expected: Sequence[int]) -> bool:
    return len(shape) == len(expected) and all(e == -1 or e == s for s, e in zip(shape, expected))


def check(array: np.ndarray, datatype: str, spec: TensorSpec, input_name: str) -> None:
    """Raise :class:`InputRejected` if ``array`` (of v2 ``datatype``) breaks a rule of ``spec``."""
    where = f"input '{input_name}'"
    if spec.datatype is not None and datatype != spec.datatype:
        raise InputRejected(f"{where}: datatype {datatype[:32]}, expected {spec.datatype}")
    if spec.shape is not None and not _shape_matches(array.shape, spec.shape):
        raise InputRejected(f"{where}: shape {list(array.shape)} does not match "
                            f"{list(spec.shape)}")
    if spec.max_elements is not None and array.size > spec.max_elements:
        raise InputRejected(f"{where}: {array.size} elements exceed the cap of "
                            f"{spec.max_elements}")
    want_range = spec.min is not None or spec.max is not None
    is_float = _is_float(array.dtype)
    if not (want_range or (spec.finite and is_float)) or array.size == 0:
        return
    if not is_float and (array.dtype == object or array.dtype.kind in "SUV"):
        if want_range:
            raise InputRejected(f"{where}: a value range applies to numeric inputs, got "
                                f"{datatype[:32]}")
        return
    flat = array.reshape(-1)
    with np.errstate(invalid="ignore"):  # min/max of NaN warn for some dtypes (bfloat16)
        low, high = flat.min(), flat.max()  # NaN propagates, so these also find NaN/Inf
    if is_float:
        finite = math.isfinite(float(low)) and math.isfinite(float(high))
        if spec.finite and not finite:
            raise InputRejected(f"{where}: contains NaN or Inf")
        if want_range and not finite and (np.isnan(float(low)) or np.isnan(float(high))):
            # finite: false and NaN present: compare the non-NaN values only.
            low, high = np.fmin.reduce(flat), np.fmax.reduce(flat)
    if want_range:
        lo = -math.inf if spec.min is None else spec.min
        hi = math.inf if spec.max is None else spec.max
        if float(low) < lo or float(high) > hi:
            raise InputRejected(f"{where}: value out of range [{_fmt(lo)}, {_fmt(hi)}]")


def spec_from_metadata(tensor_metadata, **rules) -> TensorSpec:
    """A spec (datatype + shape) from a ModelMetadataResponse.TensorMetadata; ``rules`` adds the
    others (min, max, finite, max_elements)."""
    return TensorSpec(datatype=tensor_metadata.datatype or None,
                      shape=tuple(tensor_metadata.shape), **rules)


def specs_from_metadata(metadata, **rules) -> dict[str, TensorSpec]:
    """{input name: spec} for every input of a ModelMetadataResponse."""
    return {t.name: spec_from_metadata(t, **rules) for t in metadata.inputs}


class ValidateOptions(StageOptions):
    datatype: str | None = None
    shape: list[int] | None = None
    min: float | None = None
    max: float | None = None
    finite: bool = True
    max_elements: int | None = Field(default=None, strict=True)

    @field_validator("datatype")
    @classmethod
    def _check_datatype(cls, value: str | None) -> str | None:
        return check_datatype(value)

    @field_validator("shape")
    @classmethod
    def _check_shape(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(d < -1 for d in value):
            raise ValueError(f"shape dimensions must be >= 0 or -1 (any size), got {value}")
        return value

    @field_validator("min", "max")
    @classmethod
    def _check_bound(cls, value: float | None) -> float | None:
        if value is not None and math.isnan(value):
            raise ValueError("min and max must be numbers, not NaN")
        return value

    @field_validator("max_elements")
    @classmethod
    def _check_cap(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f"max_elements must be >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _check_order(self):
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({_fmt(self.min)}) must be <= max ({_fmt(self.max)})")
        return self

    def spec(self) -> TensorSpec:
        return TensorSpec(self.datatype, None if self.shape is None else tuple(self.shape),
                          self.min, self.max, self.finite, self.max_elements)


class ValidateTensor(Transform):
    """The ``validate.tensor`` stage: checks one input against a :class:`TensorSpec`."""
    # Every datatype: shape/datatype/cap rules apply to BYTES too (range rules need numbers).
    accepts = NUMERIC_DATATYPES | TEXT_DATATYPES

    def __init__(self, spec: TensorSpec):
        self.spec = spec

    def apply(self, array: np.ndarray, ctx: TransformContext) -> TransformResult:
        check(array, ctx.datatype, self.spec, ctx.input_name)
        return TransformResult(array, {})


register("validate.tensor", "transform", ValidateOptions, lambda o: ValidateTensor(o.spec()))
