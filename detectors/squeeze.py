"""`detect.squeeze`: feature squeezing (Xu, Evans & Qi, NDSS 2018) as a response stage.

The model is asked about the client's image *and* about squeezed copies of it (fewer bits per
pixel, a median filter, JPEG); a natural image gets nearly the same answer from all of them, an
adversarial one - whose perturbation lives in exactly the detail squeezing removes - does not.
The score is the largest L1 distance between the softmax of the original's output and the softmax
of a squeezed copy's output (0 = identical, 2 = disjoint), over the squeezers and over the rows
of the batch. The squeezers are the image transforms of :mod:`bastion.transforms.image` (ART
semantics), so a squeezer here computes exactly what ``transform.bit_depth`` / ``.median`` /
``.jpeg`` compute.

Options
    ``input`` ("image"): the image input to squeeze (4-D NCHW/NHWC, or a 3-D image without batch
    dimension; UINT8 or float). ``output`` ("logits"): the model output compared. ``softmax``
    (true): apply a softmax over each row of ``output`` first; set false when the output is
    already probabilities. ``squeezers``: ``bit_depth:<bits>``, ``median:<k>``,
    ``jpeg:<quality>`` (default ``["bit_depth:1", "median:2", "jpeg:75"]``). ``layout``,
    ``range``: as for the image transforms. ``batched`` (true): see below.

Batched (the default): ONE upstream request
    ``prepare`` appends each squeezer's copy of the N rows to the request's batch (original rows
    first, then squeezer 1's N rows, squeezer 2's, ...), and repeats every other input the same
    way, so the upstream answers N * (1 + V) rows in one call. ``on_response`` slices every
    output back to the first N rows (raw contents re-encoded, shapes fixed), so the client gets
    exactly what the upstream answers for its own request, provided the model computes each
    row independently of the others (onnxruntime on CPU does, bit for bit, for the demo CNN:
    tests/test_squeeze_smoothing.py compares with direct calls; a server whose kernels change
    with the batch size may differ in the last bits). Batching needs a batch dimension: a 3-D
    image, or another input whose first dimension is not N, falls back to unbatched.

Unbatched (``batched: false``)
    The client's request is forwarded as it is, and ``on_response`` sends one extra request per
    squeezer, in parallel: 1 + V upstream calls.

Outputs
    If the client named the outputs it wants and ``output`` is not among them, ``output`` is
    added to the forwarded request and removed from the answer again. The result's
    ``extra_items`` (metric ``bastion_extra_upstream_items_total``) is N * V.

Order with other response stages: put ``smooth.randomized`` *before* ``detect.squeeze``. Stages
prepare in pipeline order, so smoothing reads the client's image before the variants are batched
in; they finish in reverse order, so this stage has sliced the answer back to the client's rows
before smoothing rewrites it.

The pure pieces (:func:`parse_squeezer`, :meth:`FeatureSqueezer.variants`,
:func:`squeeze_distances`) are what tools/eval_squeeze_smoothing.py measures, so the evaluation
scores exactly what the stage scores.
"""
from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
from pydantic import field_validator

from bastion.core.registry import register
from bastion.detectors.base import ResponseResult, ResponseStage
from bastion.protos import codec, pb
from bastion.transforms.base import TransformContext
from bastion.transforms.image import (IMAGE_DATATYPES, BitDepth, ImageOptions, ImageTransform,
                                      Jpeg, Median)

DEFAULT_SQUEEZERS = ("bit_depth:1", "median:2", "jpeg:75")
_SQUEEZERS = {"bit_depth": BitDepth, "median": Median, "jpeg": Jpeg}


def parse_squeezer(spec: str, layout: str = "NCHW",
                   range: tuple[float, float] = (0.0, 1.0)) -> ImageTransform:
    """``"bit_depth:1"`` -> BitDepth(1), ``"median:2"`` -> Median(2), ``"jpeg:75"`` -> Jpeg(75)."""
    name, sep, value = str(spec).partition(":")
    kind = _SQUEEZERS.get(name.strip())
    if kind is None or not sep:
        raise ValueError(f"squeezer {spec!r}: expected bit_depth:<bits>, median:<k> or "
                         "jpeg:<quality>")
    try:
        parameter = int(value)
    except ValueError:
        raise ValueError(f"squeezer {spec!r}: {value!r} is not an integer") from None
    try:
        return kind(parameter, layout=layout, range=range)
    except ValueError as err:  # the transform's own option check (bits 1..16, k >= 2, ...)
        message = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
        raise ValueError(f"squeezer {spec!r}: {message.removeprefix('Value error, ')}") from None


class SqueezeOptions(ImageOptions):
    input: str = "image"
    output: str = "logits"
    softmax: bool = True
    squeezers: tuple[str, ...] = DEFAULT_SQUEEZERS
    batched: bool = True

    @field_validator("squeezers")
    @classmethod
    def _check_squeezers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one squeezer")
        for spec in value:
            parse_squeezer(spec)
        if len(set(value)) != len(value):
            raise ValueError("a squeezer is listed twice")
        return value


# ------------------------------------------------------------------------------------------
# Pure pieces, shared with the evaluation tooling


def softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def output_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """An output as float64 [rows, -1] (a 3-D image's answer, without batch dim, is one row)."""
    return np.asarray(array, dtype=np.float64).reshape(rows, -1)


def squeeze_distances(original: np.ndarray, variants: list[np.ndarray],
                      apply_softmax: bool = True) -> np.ndarray:
    """L1 distances [V, rows] between the (softmax of the) original output rows [rows, C] and
    each variant's rows. Non-finite outputs count as the largest distance (2)."""
    def prob(rows):
        rows = np.asarray(rows, dtype=np.float64)
        return softmax(rows.copy()) if apply_softmax else rows

    reference = prob(original)
    out = np.stack([np.abs(prob(v) - reference).sum(axis=1) for v in variants]) if variants \
        else np.zeros((0, len(reference)))
    out[~np.isfinite(out)] = 2.0
    return out


def request_template(request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    """A copy of ``request`` without tensor data, to be filled with :func:`with_inputs`."""
    template = pb.ModelInferRequest()
    template.CopyFrom(request)
    del template.raw_input_contents[:]
    for item in template.inputs:
        item.ClearField("contents")
    return template


def with_inputs(template: pb.ModelInferRequest, arrays: dict[str, np.ndarray],
                datatypes: dict[str, str]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    request.CopyFrom(template)
    codec.encode_request(request, arrays, datatypes)
    return request


def repeat_rows(arrays: dict[str, np.ndarray], index: np.ndarray, skip: str) -> dict:
    """Every input but ``skip`` with its rows taken at ``index`` (all share the batch dim)."""
    return {name: array[index] for name, array in arrays.items() if name != skip}


def shares_batch(arrays: dict[str, np.ndarray], rows: int) -> bool:
    return all(array.ndim >= 1 and array.shape[0] == rows for array in arrays.values())


# ------------------------------------------------------------------------------------------
# The stage


@dataclasses.dataclass
class _State:
    rows: int                 # N: rows of the client's request (1 for a 3-D image)
    batched: bool             # variants appended to the forwarded request
    strip_output: bool        # `output` was added for us: remove it from the answer
    variants: list            # unbatched: one request per squeezer
    skip: bool = False        # no input to squeeze


class FeatureSqueezer(ResponseStage):
    accepts = IMAGE_DATATYPES

    def __init__(self, options: SqueezeOptions):
        self.options = options
        self.input = options.input
        self.output = options.output
        self.squeezers = [(spec, parse_squeezer(spec, options.layout, options.range))
                          for spec in options.squeezers]

    def variants(self, image: np.ndarray, request_id: str = "",
                 datatype: str | None = None) -> list[np.ndarray]:
        """The squeezed copies of ``image``, one per squeezer, same shape and dtype."""
        ctx = TransformContext(request_id, self.input, datatype or codec.datatype_of(image))
        return [transform.apply(image, ctx).array for _, transform in self.squeezers]

    # --- before the upstream call ---------------------------------------------------------
    def prepare(self, request, inputs, request_id):
        # The forwarded request is the truth (in monitor mode a request stage's transform is
        # not forwarded): read the image from it, not from the pipeline's inputs.
        arrays = codec.decode_request(request)
        datatypes = {t.name: t.datatype for t in request.inputs}
        image = arrays.get(self.input)
        if image is None:
            return _State(0, False, False, [], skip=True)
        if datatypes[self.input] not in self.accepts:
            raise ValueError(f"input '{self.input}' is {datatypes[self.input]}; detect.squeeze "
                             f"accepts {', '.join(sorted(self.accepts))}")
        rows = image.shape[0] if image.ndim == 4 else 1
        if rows == 0:
            return _State(0, False, False, [], skip=True)
        # Everything that can fail comes before the request is changed: a stage that fails
        # here follows on_error with the client's request forwarded as it came.
        variants = self.variants(image, request_id, datatypes[self.input])
        strip = bool(request.outputs) and all(o.name != self.output for o in request.outputs)
        if strip:
            request.outputs.add(name=self.output)
        batched = self.options.batched and image.ndim == 4 and shares_batch(arrays, rows)
        if batched:
            blocks = 1 + len(variants)
            combined = dict(repeat_rows(arrays, np.tile(np.arange(rows), blocks), self.input))
            combined[self.input] = np.concatenate([image, *variants])
            ordered = {name: combined[name] for name in arrays}  # keep the input order
            codec.encode_request(request, ordered, datatypes)
            return _State(rows, True, strip, [])
        template = request_template(request)
        extra = [with_inputs(template, {**arrays, self.input: variant}, datatypes)
                 for variant in variants]
        return _State(rows, False, strip, extra)

    # --- after it -------------------------------------------------------------------------
    async def on_response(self, state: _State, response, call_upstream) -> ResponseResult:
        if state.skip and not state.strip_output:
            return ResponseResult(0.0)
        rows, count = state.rows, len(self.squeezers)
        total = rows * (1 + count) if state.batched else None
        outputs = codec.decode_response(response)
        scored = outputs.get(self.output)
        # Rewrite first: whatever happens next (a failure, the budget), the client gets only
        # its own rows and outputs.
        self._rewrite(response, outputs, state, total)
        if state.skip:
            return ResponseResult(0.0)
        if scored is None:
            raise ValueError(f"the upstream's answer has no output '{self.output}'")
        if state.batched:
            if scored.ndim == 0 or scored.shape[0] != total:
                raise ValueError(f"output '{self.output}' has shape {list(scored.shape)}, "
                                 f"expected {total} rows (N={rows} x {1 + count})")
            blocks = output_rows(scored, total).reshape(1 + count, rows, -1)
            original, variants = blocks[0], list(blocks[1:])
        else:
            original = output_rows(scored, rows)
            answers = await asyncio.gather(*(call_upstream(r) for r in state.variants))
            variants = []
            for answer in answers:
                values = codec.decode_response(answer).get(self.output)
                if values is None:
                    raise ValueError(f"a squeezed copy's answer has no output '{self.output}'")
                variants.append(output_rows(values, rows))
        distances = squeeze_distances(original, variants, self.options.softmax)  # [V, rows]
        worst = np.unravel_index(int(np.argmax(distances)), distances.shape)
        score = float(distances[worst])
        reasons = [f"squeeze:{self.squeezers[worst[0]][0]}"] if score > 0 else []
        return ResponseResult(score, reasons, extra_items=rows * count)

    def _rewrite(self, response, outputs: dict, state: _State, total: int | None) -> None:
        """Slice every batched output back to the client's rows; drop ``output`` if the client
        did not ask for it."""
        if state.strip_output and self.output in outputs:
            position = next(i for i, t in enumerate(response.outputs) if t.name == self.output)
            del response.outputs[position]
            del outputs[self.output]
        if total is not None:
            for name, array in outputs.items():
                # An output with another row count is not the model's batch (e.g. one an
                # earlier response stage added for the client's rows): left as it is.
                if array.ndim and array.shape[0] == total:
                    outputs[name] = array[:state.rows]
        elif not state.strip_output:
            return
        if not outputs:
            del response.outputs[:]
            del response.raw_output_contents[:]
            return
        datatypes = {t.name: t.datatype for t in response.outputs}
        codec.encode_response(response, outputs, datatypes)


def _build(options: SqueezeOptions) -> FeatureSqueezer:
    return FeatureSqueezer(options)


register("detect.squeeze", "response", SqueezeOptions, _build)

__all__ = ["DEFAULT_SQUEEZERS", "FeatureSqueezer", "SqueezeOptions", "parse_squeezer",
           "squeeze_distances", "softmax", "output_rows", "request_template", "with_inputs"]
