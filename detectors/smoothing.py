"""`smooth.randomized`: certified randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019).

A mode of a model, opt-in by putting the stage in its pipeline. The client's request is forwarded
as it is (the clean answer); then, for each row of the image input, ``n0 + n`` Gaussian-noised
copies (``x + N(0, sigma^2 I)``) are sent upstream in batches of ``batch_size`` and the class
each copy gets is counted. This is Cohen et al.'s CERTIFY:

1. the ``n0`` selection copies pick the top class ``cA`` (most frequent; ties: lowest index);
2. ``nA`` of the ``n`` estimation copies get ``cA``; ``pA_lower`` is the one-sided
   (1 - alpha) Clopper-Pearson lower bound ``Beta.ppf(alpha, nA, n - nA + 1)`` (0 if nA = 0);
3. ``pA_lower < 0.5``: abstain; else the smoothed classifier answers ``cA`` and is certified
   robust within L2 radius ``sigma * Phi^-1(pA_lower)`` around the input.

Noise is drawn from numpy's PCG64 seeded with :func:`bastion.transforms.image.noise_seed` of
(request id, input name) - row r of the batch uses the seed sequence ``[seed, r]``, selection
copies first, then estimation copies - so the same request id always gets the same answer (the
proxy makes a fresh random id per request, so a client can neither choose nor predict the noise).
Noisy copies are clipped to ``range`` (the model's input domain, default [0, 1]) unless
``clip: false``: the certificate is about the smoothed classifier of ``f(clip(.))``, which is a
classifier like any other, so it holds either way (Cohen et al.'s theorem needs nothing of f).

What the client gets (``abstain`` decides what happens when a row abstains)
    * The clean answer: every output the upstream returned for the client's request, unchanged
      (``rewrite: append``, the default).
    * Two added outputs, one value per row of the batch: ``smoothed_class`` INT64 ``[N]`` - the
      smoothed classifier's class, -1 where it abstained - and ``certified_radius`` FP64 ``[N]``
      - the certified L2 radius (in the input's units), 0.0 where it abstained. These are what a
      client should read (``result.as_numpy("smoothed_class")`` with tritonclient).
    * Response parameters: ``bastion.certified_radius`` (double: the smallest radius over the
      rows; 0.0 if a row abstained), ``bastion.smoothing_abstain`` (bool: some row abstained) and,
      for a single-row request, ``bastion.smoothed_class`` (int64, -1 if it abstained).
    * ``rewrite: replace`` instead overwrites the class output ``output`` (shape and dtype kept)
      with the estimation frequencies ``counts / n``, so a client's argmax is the smoothed class
      for every certified row (``pA_lower >= 0.5`` means cA holds a strict majority of the
      counts); an integer label output ``[N]`` gets the smoothed class (-1 if abstained).
    * ``abstain: status`` (default): a row that abstains refuses the whole answer with
      ``abstain_status`` (default UNAVAILABLE), details ``bastion: refused by <stage>
      (smoothing_abstain)`` - in monitor mode this only annotates. ``abstain: flag``: the answer
      goes through with ``bastion.smoothing_abstain = true`` and the reason
      ``smoothing_abstain``; the reason shows in ``bastion.reasons`` when the stage's threshold
      acts (``threshold: 0.5, action: flag`` flags exactly the abstentions, up to the tie
      pA_lower = 0.5), since the proxy reports a response stage's reasons only for acting stages.

Score: ``1 - pA_lower`` (the worst row), so a threshold flags low-confidence answers. Cost:
``extra_items`` = N * (n0 + n), sent in ceil(N * (n0 + n) / batch_size) extra upstream calls, at
most ``concurrency`` at a time.

Every input other than the image is repeated row by row, so all inputs must share the batch
dimension; the image must be 4-D (NCHW or NHWC) and of a float type.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from bastion.core.registry import register
from bastion.detectors.base import ResponseResult, ResponseStage
from bastion.detectors.squeeze import request_template, shares_batch, with_inputs
from bastion.protos import codec
from bastion.transforms.base import FLOAT_DATATYPES
from bastion.transforms.image import ImageOptions, Sigma, noise_seed

CLASS_OUTPUT = "smoothed_class"
RADIUS_OUTPUT = "certified_radius"
ABSTAIN_REASON = "smoothing_abstain"
ABSTAIN = -1


class SmoothingOptions(ImageOptions):
    input: str = "image"
    output: str = "logits"
    sigma: Sigma
    n0: int = Field(100, ge=1)
    n: int = Field(1000, ge=1)
    alpha: float = Field(0.001, gt=0, lt=0.5)
    batch_size: int = Field(256, ge=1)
    concurrency: int = Field(4, ge=1)
    abstain: Literal["status", "flag"] = "status"
    abstain_status: str = "UNAVAILABLE"
    rewrite: Literal["append", "replace"] = "append"
    clip: bool = True

    @field_validator("abstain_status")
    @classmethod
    def _check_status(cls, value: str) -> str:
        import grpc
        if value not in grpc.StatusCode.__members__ or value == "OK":
            raise ValueError(f"{value!r} is not a gRPC status code name other than OK "
                             "(e.g. UNAVAILABLE, FAILED_PRECONDITION)")
        return value


# ------------------------------------------------------------------------------------------
# Pure pieces (the evaluation and the tests use these)


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from n_a successes in n trials."""
    from scipy.stats import beta
    if n_a <= 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


@dataclasses.dataclass(frozen=True)
class Certificate:
    smoothed_class: int    # -1: abstain
    p_lower: float
    radius: float          # 0.0 when abstaining
    counts: np.ndarray     # estimation counts per class

    @property
    def abstained(self) -> bool:
        return self.smoothed_class == ABSTAIN


def certify(selection: np.ndarray, estimation: np.ndarray, sigma: float, alpha: float,
            classes: int | None = None) -> Certificate:
    """CERTIFY from the classes the noisy copies got (``selection``: n0 of them, ``estimation``:
    n of them)."""
    from scipy.stats import norm
    size = max(int(classes or 0), int(selection.max(initial=-1)) + 1,
               int(estimation.max(initial=-1)) + 1, 1)
    top = int(np.argmax(np.bincount(selection, minlength=size)))
    counts = np.bincount(estimation, minlength=size)
    p_lower = lower_confidence_bound(int(counts[top]), len(estimation), alpha)
    if p_lower < 0.5:
        return Certificate(ABSTAIN, p_lower, 0.0, counts)
    return Certificate(top, p_lower, float(sigma * norm.ppf(p_lower)), counts)


def predicted_classes(values: np.ndarray, rows: int) -> np.ndarray:
    """The class of each row: argmax of a score output, or an integer label output as is."""
    flat = np.asarray(values).reshape(rows, -1)
    if flat.shape[1] == 1 and flat.dtype.kind in "iu":
        return flat[:, 0].astype(np.int64)
    return np.argmax(flat, axis=1).astype(np.int64)


class NoiseStream:
    """Gaussian noise for ``rows`` images, ``per_row`` copies each, in row-major order, produced
    a chunk at a time; the same (seed, shape) always gives the same noise, whatever the chunking."""

    def __init__(self, seed: int, rows: int, per_row: int, image_shape: tuple[int, ...],
                 dtype: np.dtype):
        self.generators = [np.random.default_rng([seed, row]) for row in range(rows)]
        self.per_row = per_row
        self.image_shape = image_shape
        self.dtype = dtype
        self.position = 0

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(noise [count, *image_shape], row of each copy)."""
        out = np.empty((count, *self.image_shape), dtype=self.dtype)
        index = np.arange(self.position, self.position + count) // self.per_row
        done = 0
        while done < count:
            row = (self.position + done) // self.per_row
            left_in_row = self.per_row - (self.position + done) % self.per_row
            piece = min(left_in_row, count - done)
            self.generators[row].standard_normal(out=out[done:done + piece], dtype=self.dtype)
            done += piece
        self.position += count
        return out, index


# ------------------------------------------------------------------------------------------
# The stage


@dataclasses.dataclass
class _State:
    rows: int
    image: np.ndarray | None
    arrays: dict
    datatypes: dict
    template: object
    seed: int


class RandomizedSmoothing(ResponseStage):
    accepts = FLOAT_DATATYPES

    def __init__(self, options: SmoothingOptions):
        self.options = options
        self.input = options.input
        self.output = options.output

    def prepare(self, request, inputs, request_id):
        arrays = codec.decode_request(request)
        datatypes = {t.name: t.datatype for t in request.inputs}
        image = arrays.get(self.input)
        if image is None:
            return _State(0, None, {}, {}, None, 0)
        if datatypes[self.input] not in self.accepts:
            raise ValueError(f"input '{self.input}' is {datatypes[self.input]}; "
                             f"smooth.randomized accepts {', '.join(sorted(self.accepts))}")
        if image.ndim != 4:
            raise ValueError(f"input '{self.input}': smooth.randomized needs a 4-D "
                             f"{self.options.layout} batch, got {image.ndim} dimension(s)")
        rows = image.shape[0]
        if not shares_batch(arrays, rows):
            raise ValueError("smooth.randomized: every input must share the image's batch "
                             "dimension")
        template = request_template(request)
        del template.outputs[:]
        template.outputs.add(name=self.output)
        return _State(rows, image, arrays, datatypes, template,
                      noise_seed(request_id, self.input))

    # --- noisy copies -------------------------------------------------------------------
    def _chunk(self, state: _State, stream: NoiseStream, count: int):
        noise, index = stream.take(count)
        dtype = state.image.dtype
        compute = np.float64 if dtype == np.float64 else np.float32
        noise *= self.options.sigma
        noise += state.image[index].astype(compute, copy=False)
        if self.options.clip:
            np.clip(noise, *self.options.range, out=noise)
        arrays = {name: (noise.astype(dtype, copy=False) if name == self.input else array[index])
                  for name, array in state.arrays.items()}
        return with_inputs(state.template, arrays, state.datatypes)

    async def sample_classes(self, state: _State, call_upstream) -> np.ndarray:
        """The class each noisy copy got: [rows, n0 + n] (selection copies first)."""
        o = self.options
        per_row = o.n0 + o.n
        total = state.rows * per_row
        compute = np.float64 if state.image.dtype == np.float64 else np.float32
        stream = NoiseStream(state.seed, state.rows, per_row, state.image.shape[1:], compute)
        classes = np.full(total, -1, dtype=np.int64)
        gate = asyncio.Semaphore(o.concurrency)

        async def send(start: int, count: int, request) -> None:
            try:
                answer = await call_upstream(request)
            finally:
                gate.release()
            values = codec.decode_response(answer).get(self.output)
            if values is None:
                raise ValueError(f"a noisy copy's answer has no output '{self.output}'")
            classes[start:start + count] = predicted_classes(values, count)

        tasks = []
        try:
            for start in range(0, total, o.batch_size):
                count = min(o.batch_size, total - start)
                await gate.acquire()
                # Chunks are made one after the other (the noise stream is sequential); the
                # upstream calls overlap.
                request = await asyncio.to_thread(self._chunk, state, stream, count)
                tasks.append(asyncio.create_task(send(start, count, request)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        return classes.reshape(state.rows, per_row)

    # --- after the upstream call ----------------------------------------------------------
    async def on_response(self, state: _State, response, call_upstream) -> ResponseResult:
        o = self.options
        if state.image is None or state.rows == 0:
            return ResponseResult(0.0)
        classes = await self.sample_classes(state, call_upstream)
        known = None
        clean = codec.decode_response(response)
        if self.output in clean and clean[self.output].ndim >= 2:
            known = int(np.prod(clean[self.output].shape[1:]))
        certificates = [certify(row[:o.n0], row[o.n0:], o.sigma, o.alpha, known)
                        for row in classes]
        self._rewrite(response, clean, certificates)
        abstained = any(c.abstained for c in certificates)
        score = max(1.0 - c.p_lower for c in certificates)
        parameters: dict = {
            "bastion.certified_radius": float(min(c.radius for c in certificates)),
            "bastion.smoothing_abstain": abstained,
        }
        if state.rows == 1:
            parameters["bastion.smoothed_class"] = int(certificates[0].smoothed_class)
        extra = state.rows * (o.n0 + o.n)
        if abstained and o.abstain == "status":
            return ResponseResult(score, [], parameters, refusal=(o.abstain_status, ABSTAIN_REASON),
                                  extra_items=extra)
        return ResponseResult(score, [ABSTAIN_REASON] if abstained else [], parameters,
                              flag=ABSTAIN_REASON if abstained else None, extra_items=extra)

    def _rewrite(self, response, clean: dict, certificates: list[Certificate]) -> None:
        classes = np.array([c.smoothed_class for c in certificates], dtype=np.int64)
        radii = np.array([c.radius for c in certificates], dtype=np.float64)
        outputs = dict(clean)
        datatypes = {t.name: t.datatype for t in response.outputs}
        rows = len(certificates)
        current = outputs.get(self.output)
        if self.options.rewrite == "replace" and current is not None and current.ndim \
                and current.shape[0] >= rows:
            # The client's rows are the first `rows` (detect.squeeze after this stage appends
            # its variants' rows behind them).
            replaced = np.array(current, copy=True)
            if current.dtype.kind in "iu" and current[:rows].size == rows:
                replaced[:rows] = classes.astype(current.dtype).reshape(replaced[:rows].shape)
            else:
                width = int(np.prod(current.shape[1:]))
                freq = np.zeros((rows, width), dtype=np.float64)
                for row, cert in enumerate(certificates):
                    counts = cert.counts[:width]
                    freq[row, :len(counts)] = counts / max(1, cert.counts.sum())
                replaced[:rows] = freq.astype(current.dtype).reshape(replaced[:rows].shape)
            outputs[self.output] = replaced
        for name in (CLASS_OUTPUT, RADIUS_OUTPUT):
            if name in outputs:
                raise ValueError(f"the model already has an output '{name}'")
        outputs[CLASS_OUTPUT] = classes
        outputs[RADIUS_OUTPUT] = radii
        datatypes.update({CLASS_OUTPUT: "INT64", RADIUS_OUTPUT: "FP64"})
        codec.encode_response(response, outputs, datatypes)


register("smooth.randomized", "response", SmoothingOptions, RandomizedSmoothing)

__all__ = ["RandomizedSmoothing", "SmoothingOptions", "Certificate", "certify",
           "lower_confidence_bound", "predicted_classes", "NoiseStream"]
