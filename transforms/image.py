"""Input transformations for image tensors: bit-depth reduction, median smoothing, JPEG, noise.

These are the classic "input transformation" defences (Xu et al. 2017 feature squeezing, Guo et
al. 2017 JPEG / median), with the semantics of IBM ART's preprocessors so results can be compared
one to one:

* ``transform.bit_depth`` {bits} - ART ``FeatureSqueezing``:
  ``x' = rint(x_n * (2^b - 1)) / (2^b - 1)`` on ``x_n = (x - lo) / (hi - lo)``, scaled back.
* ``transform.median`` {k} - ART ``SpatialSmoothing``: ``scipy.ndimage.median_filter`` with a
  k x k window over the spatial dims only (1 over batch and channels), mode "reflect". k = 3 uses
  an exact, faster sorting network (tests check it against scipy element for element).
* ``transform.jpeg`` {quality} - ART ``JpegCompression``: to uint8 0..255, encode/decode with
  Pillow at quality q one image at a time (3 channels as mode "RGB", any other channel count one
  channel at a time as mode "L"), back to the range.
* ``transform.noise`` {sigma} - ART ``GaussianAugmentation(augmentation=False)``:
  ``x + N(0, sigma^2)``, clipped to the range, seeded per request.

All take ``layout`` ("NCHW" | "NHWC", default "NCHW") and ``range`` ([lo, hi], default [0, 1]).
JPEG and median are registered with ``offload=True`` (milliseconds per 224 x 224 image).

Tensors
    Layout NCHW (default) or NHWC; a 3-D tensor is one image without the batch dimension (CHW or
    HWC, by the same option). Grayscale images carry their channel dimension (C = 1). Other ranks
    are rejected (:class:`InputRejected`): a flat ``[N, 784]`` tensor is not an image.

Datatypes (``accepts``)
    UINT8 (values 0..255; the ``range`` option does not apply) and the float types FP16, FP32,
    FP64 and BF16 (values in ``range`` = [lo, hi], default [0, 1]). FP16/BF16 are computed in
    float32 and FP64 in float64; the result always has the input's dtype and shape.

Values outside the range
    A transform never rejects on values (``validate.tensor`` does that). Before transforming, float
    NaN becomes ``lo``, +Inf ``hi``, -Inf ``lo``, and everything is clipped to [lo, hi]; outputs
    are always within [lo, hi]. Put ``validate.tensor`` with ``finite``/``min``/``max`` first in a
    pipeline to refuse such inputs instead.

Differences from ART (all covered by tests/test_image_art_parity.py)
    * bit_depth, UINT8: ART returns floats; here the quantised levels are rounded to the nearest
      integer (e.g. 3 bits: levels 0, 36, 73, ..., 255). FP32 / FP64 results equal ART's (cast to
      the input dtype) bit for bit. median: equal to ART's bit for bit, even k included.
    * jpeg, floats: ART converts to uint8 by truncating ``x * 255`` (so its output is darker by
      0.5/255 on average); here the value is rounded (``rint((x - lo) * 255 / (hi - lo))``).
      FP32/FP64 inputs on the 1/255 grid give ART's result exactly; other inputs can land one
      input level apart, which JPEG spreads over the 8x8 block: measured mean |ours - ART|
      0.6-1.5/255 on smooth images, up to 2.4/255 on white noise. ART also only supports ranges
      [0, 1] and [0, 255]; any [lo, hi] works here. UINT8 results equal ART's exactly (same
      Pillow).
    * noise: ART draws from the global ``np.random`` state; here the generator is seeded from
      sha256(request id, input name), so the same request id always gets the same noise
      (reproducible for debugging) while requests differ; the proxy makes a fresh uuid4 id per
      request, so a client cannot choose or predict the seed. UINT8 results are rounded to integers.
      ``sigma`` is in the data's own units (0..255 for UINT8), as in ART.

Counts: ``{key: number of elements whose value changed}`` with the key "bit_depth", "median",
"jpeg" or "noise". For float inputs not already on the 1/255 grid, JPEG changes almost every
element; for JPEG and noise the count is mostly a measure of image size, for bit depth and median
it is a real signal (a smooth natural image changes little under a 3x3 median, adversarial noise
changes a lot).

Everything here is pure: transforms hold only their immutable options, so one instance serves
every request on every thread.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import math
from typing import Annotated, ClassVar, Literal

import ml_dtypes
import numpy as np
from pydantic import AfterValidator, Field, field_validator

from bastion.core.registry import StageOptions, register
from bastion.transforms.base import InputRejected, Transform, TransformContext, TransformResult

#: Datatypes the image transforms accept (UINT8 and every float type).
IMAGE_DATATYPES = frozenset({"UINT8", "FP16", "FP32", "FP64", "BF16"})

Layout = Literal["NCHW", "NHWC"]
_UINT8_RANGE = (0.0, 255.0)
_JPEG_MAX_SIDE = 65_500  # libjpeg's limit is 65535


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

class ImageOptions(StageOptions):
    """Options every image transform takes."""
    layout: Layout = "NCHW"
    #: [lo, hi] of float inputs (UINT8 is always 0..255).
    range: tuple[float, float] = (0.0, 1.0)

    @field_validator("range")
    @classmethod
    def _check_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise ValueError(f"range must be [lo, hi] with finite lo < hi, got [{lo:g}, {hi:g}]")
        return value


def _int_option(name: str, lo: int, hi: int | None = None):
    """An ``int`` option checked to lie in [lo, hi] (hi None: no upper bound), whose error names
    the option and the range."""
    def check(value: int) -> int:
        if value < lo or (hi is not None and value > hi):
            bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"{name} must be an integer {bound}, got {value}")
        return value
    return Annotated[int, Field(strict=True), AfterValidator(check)]


class BitDepthOptions(ImageOptions):
    bits: _int_option("bits", 1, 16)


class MedianOptions(ImageOptions):
    k: _int_option("k (the median window size)", 2)


class JpegOptions(ImageOptions):
    quality: _int_option("quality", 1, 95)


def _positive_sigma(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {value:g}")
    return value


#: A Gaussian noise level in pixel units (noise transform, randomized smoothing).
Sigma = Annotated[float, AfterValidator(_positive_sigma)]


class NoiseOptions(ImageOptions):
    sigma: Sigma


# --------------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------------

def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == ml_dtypes.bfloat16


def _require(module: str, package: str, stage: str) -> None:
    """Import an optional dependency when a stage is built, so a config naming the stage fails
    validation with a clear message instead of every request failing later."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"{stage} needs the {package} package ({err}); "
                         f"install it with: pip install {package}") from None


def noise_seed(request_id: str, input_name: str) -> int:
    """A stable 64-bit seed for (request id, input name): same request, same noise."""
    digest = hashlib.sha256(f"{request_id}\x00{input_name}".encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest()[:8], "little")


class ImageTransform(Transform):
    """Base for the image transforms: layout/dtype handling, range clipping, counts."""
    accepts = IMAGE_DATATYPES
    #: Counts key.
    key: ClassVar[str]

    def __init__(self, layout: Layout = "NCHW", range: tuple[float, float] = (0.0, 1.0)):
        ImageOptions(layout=layout, range=range)  # same checks as config
        self.layout = layout
        self.range = (float(range[0]), float(range[1]))

    # --- to implement ---------------------------------------------------------------------
    def _run(self, work: np.ndarray, lo: float, hi: float, channel_axis: int,
             ctx: TransformContext) -> np.ndarray:
        """Transform ``work`` (uint8 for UINT8 inputs, else float32/float64, values in [lo, hi],
        4-D NCHW/NHWC or 3-D CHW/HWC per ``self.layout``); return an array of the same shape.
        A float result is clipped and cast back by the caller; a uint8 result is used as is."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------
    def apply(self, array: np.ndarray, ctx: TransformContext) -> TransformResult:
        if array.ndim not in (3, 4):
            raise InputRejected(
                f"input '{ctx.input_name}': {self.key} needs a 4-D {self.layout} tensor or a 3-D "
                f"{self.layout[1:]} image, got {array.ndim} dimension(s)")
        channel_axis = (1 if array.ndim == 4 else 0) if self.layout == "NCHW" else array.ndim - 1
        dtype = array.dtype
        if array.size == 0:
            return TransformResult(array.copy(), {self.key: 0})
        if dtype == np.uint8:
            out = self._run(array, *_UINT8_RANGE, channel_axis, ctx)
            if out.dtype != np.uint8:
                out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
            out = np.ascontiguousarray(out)
        elif _is_float(dtype):
            lo, hi = self.range
            compute = np.float64 if dtype == np.float64 else np.float32
            work = array.astype(compute)  # always a copy
            np.clip(work, lo, hi, out=work)  # maps +-Inf to the bounds, keeps NaN
            nan = np.isnan(work)
            if nan.any():
                work[nan] = lo
            out = self._run(work, lo, hi, channel_axis, ctx)
            out = np.ascontiguousarray(np.clip(out, lo, hi).astype(dtype, copy=False))
        else:
            raise InputRejected(f"input '{ctx.input_name}': {self.key} accepts "
                                f"{', '.join(sorted(IMAGE_DATATYPES))}, got {ctx.datatype}")
        # `out` never holds NaN, so a NaN input element counts as changed.
        return TransformResult(out, {self.key: int(np.count_nonzero(array != out))})


# --------------------------------------------------------------------------------------------
# The four transforms
# --------------------------------------------------------------------------------------------

class BitDepth(ImageTransform):
    """Feature squeezing: reduce each value to ``bits`` bits of its range."""
    key = "bit_depth"

    def __init__(self, bits: int, layout: Layout = "NCHW", range: tuple[float, float] = (0.0, 1.0)):
        BitDepthOptions(bits=bits, layout=layout, range=range)
        super().__init__(layout, range)
        self.bits = bits
        # UINT8 goes through a 256-entry lookup table (same formula, computed once).
        lut = self._squeeze(np.arange(256, dtype=np.float64), *_UINT8_RANGE)
        self._lut = np.clip(np.rint(lut), 0, 255).astype(np.uint8)
        self._lut.flags.writeable = False

    def _squeeze(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        # Same operations, in the same order and precision, as ART's FeatureSqueezing: the
        # normalisation in the input's precision, the rest in float64 (ART's np.rint(2**b - 1)
        # is a float64 scalar, which promotes under NumPy 2's NEP 50 rules).
        normalized = (x - lo) / (hi - lo)
        levels = np.float64(2 ** self.bits - 1)
        return np.rint(normalized * levels) / levels * (hi - lo) + lo

    def _run(self, work, lo, hi, channel_axis, ctx):
        if work.dtype == np.uint8:
            return self._lut[work]
        return self._squeeze(work, lo, hi)


# Devillard's 19-exchange median-of-9 network (after Paeth, Graphics Gems): after these
# compare-exchanges element 4 holds the median.
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
            (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def _median3(x: np.ndarray) -> np.ndarray:
    """3 x 3 median over the last two axes, mode "reflect": equal, element for element, to
    ``scipy.ndimage.median_filter(x, size=(1, ..., 1, 3, 3), mode="reflect")`` (the median of 9
    values is one of them, whatever the algorithm) and 3-10x faster, with whole-array min/max
    instead of a per-pixel selection. ``x`` must not contain NaN."""
    h, w = x.shape[-2:]
    # scipy's "reflect" (d c b a | a b c d) is numpy's "symmetric".
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="symmetric")
    v = [np.ascontiguousarray(padded[..., i:i + h, j:j + w]) for i in range(3) for j in range(3)]
    spare = np.empty_like(v[0])
    for a, b in _MEDIAN9:
        np.minimum(v[a], v[b], out=spare)
        np.maximum(v[a], v[b], out=v[b])
        v[a], spare = spare, v[a]
    return v[4]


class Median(ImageTransform):
    """Spatial smoothing: median over a k x k window of each channel of each image."""
    key = "median"

    def __init__(self, k: int, layout: Layout = "NCHW", range: tuple[float, float] = (0.0, 1.0)):
        MedianOptions(k=k, layout=layout, range=range)
        if k != 3:
            _require("scipy.ndimage", "scipy", "transform.median")
        super().__init__(layout, range)
        self.k = k

    def _run(self, work, lo, hi, channel_axis, ctx):
        if self.k == 3:
            # Put the channel axis just before H, W (a view), filter, and put it back.
            spatial_last = np.moveaxis(work, channel_axis, -3)
            return np.moveaxis(_median3(spatial_last), -3, channel_axis)

        from scipy.ndimage import median_filter

        size = [self.k] * work.ndim
        size[channel_axis] = 1
        if work.ndim == 4:
            size[0] = 1
        # scipy: for an even k the window's centre is the lower-right of the middle, and the
        # upper of the two middle values is taken (as in ART).
        return median_filter(work, size=tuple(size), mode="reflect")


class Jpeg(ImageTransform):
    """JPEG re-compression at ``quality`` with Pillow, one image at a time."""
    key = "jpeg"

    def __init__(self, quality: int, layout: Layout = "NCHW",
                 range: tuple[float, float] = (0.0, 1.0)):
        JpegOptions(quality=quality, layout=layout, range=range)
        _require("PIL.Image", "pillow", "transform.jpeg")
        super().__init__(layout, range)
        self.quality = quality

    def _encode_decode(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        buffer = io.BytesIO()
        # uint8 HxW -> mode "L", HxWx3 -> mode "RGB" (Pillow infers both from the array).
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG",
                                                          quality=self.quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded)

    def _run(self, work, lo, hi, channel_axis, ctx):
        if work.dtype == np.uint8:
            pixels = work
        else:
            scaled = (work - lo) * (255.0 / (hi - lo))
            pixels = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        # Canonical view: (N, H, W, C).
        if pixels.ndim == 3:
            pixels = pixels[None]
        if channel_axis in (0, 1):  # NCHW / CHW
            pixels = pixels.transpose(0, 2, 3, 1)
        if max(pixels.shape[1:3]) > _JPEG_MAX_SIDE:
            raise InputRejected(f"input '{ctx.input_name}': jpeg supports images up to "
                                f"{_JPEG_MAX_SIDE} pixels a side, got {pixels.shape[1]} x "
                                f"{pixels.shape[2]}")
        out = np.empty_like(pixels)
        for n in range(pixels.shape[0]):
            if pixels.shape[-1] == 3:
                out[n] = self._encode_decode(pixels[n])
            else:
                for c in range(pixels.shape[-1]):
                    out[n, :, :, c] = self._encode_decode(pixels[n, :, :, c])
        if channel_axis in (0, 1):
            out = out.transpose(0, 3, 1, 2)
        out = out.reshape(work.shape)
        if work.dtype == np.uint8:
            return np.ascontiguousarray(out)
        # float64 for the way back, as ART (uint8 / 255.0), then the caller casts.
        return out.astype(np.float64) / 255.0 * (hi - lo) + lo


class Noise(ImageTransform):
    """Additive Gaussian noise N(0, sigma^2), seeded by (request id, input name).

    The noise is drawn in the tensor's memory order, so the same image sent as NCHW and as NHWC
    gets different (equally distributed) noise."""
    key = "noise"

    def __init__(self, sigma: float, layout: Layout = "NCHW",
                 range: tuple[float, float] = (0.0, 1.0)):
        NoiseOptions(sigma=sigma, layout=layout, range=range)
        super().__init__(layout, range)
        self.sigma = float(sigma)

    def _run(self, work, lo, hi, channel_axis, ctx):
        rng = np.random.default_rng(noise_seed(ctx.request_id, ctx.input_name))
        compute = np.float64 if work.dtype == np.float64 else np.float32
        noise = rng.standard_normal(work.shape, dtype=compute)
        noise *= self.sigma
        noise += work
        return noise


# --------------------------------------------------------------------------------------------
# Stage registration
# --------------------------------------------------------------------------------------------

def _common(options: ImageOptions) -> dict:
    return {"layout": options.layout, "range": options.range}


register("transform.bit_depth", "transform", BitDepthOptions,
         lambda o: BitDepth(o.bits, **_common(o)))
register("transform.median", "transform", MedianOptions,
         lambda o: Median(o.k, **_common(o)), offload=True)
register("transform.jpeg", "transform", JpegOptions,
         lambda o: Jpeg(o.quality, **_common(o)), offload=True)
register("transform.noise", "transform", NoiseOptions,
         lambda o: Noise(o.sigma, **_common(o)))
