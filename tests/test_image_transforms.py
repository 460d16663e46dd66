"""Image transforms (bit depth, median, JPEG, noise): shapes, dtypes, ranges, counts, options.

Parity with IBM ART's preprocessors is in tests/test_image_art_parity.py (needs ART installed).
"""
from __future__ import annotations

import concurrent.futures

import ml_dtypes
import numpy as np
import pytest
from pydantic import ValidationError

from bastion import stage_catalog
from bastion.transforms import image
from bastion.transforms.base import InputRejected, TransformContext
from bastion.transforms.image import BitDepth, Jpeg, Median, Noise

DTYPES = {"UINT8": np.dtype(np.uint8), "FP16": np.dtype(np.float16),
          "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
TRANSFORMS = {
    "bit_depth": lambda **kw: BitDepth(3, **kw),
    "median": lambda **kw: Median(3, **kw),
    "jpeg": lambda **kw: Jpeg(50, **kw),
    "noise": lambda **kw: Noise(0.1, **kw),
}


def ctx(datatype="FP32", request_id="req-1", input_name="image"):
    return TransformContext(request_id, input_name, datatype)


def bounds(datatype, value_range=(0.0, 1.0)):
    return (0.0, 255.0) if datatype == "UINT8" else value_range


def random_image(datatype="FP32", layout="NCHW", n=2, c=3, h=12, w=10, batch=True, seed=0,
                 value_range=(0.0, 1.0)):
    rng = np.random.default_rng(seed)
    shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    if not batch:
        shape = shape[1:]
    if datatype == "UINT8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    lo, hi = value_range
    return (lo + (hi - lo) * rng.random(shape)).astype(DTYPES[datatype])


def smooth_image(layout="NCHW", n=2, c=3, h=32, w=32):
    """A smooth float image (gradients): what JPEG is good at."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [0.5 + 0.4 * np.sin(2 * x + k) * np.cos(1.5 * y - k) for k in range(c)]
    one = np.stack(channels)  # C, H, W
    batch = np.stack([one] * n).astype(np.float32)
    return batch if layout == "NCHW" else batch.transpose(0, 2, 3, 1).copy()


def as_float(a):
    return a.astype(np.float64)


# --------------------------------------------------------------------------------------------
# Every transform: shape, dtype, range, counts, purity
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("datatype", DTYPES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("batch", [True, False])
def test_shape_dtype_range_and_counts(name, layout, datatype, channels, batch):
    transform = TRANSFORMS[name](layout=layout)
    x = random_image(datatype, layout, c=channels, batch=batch)
    x.flags.writeable = False  # decoded request tensors are read-only views
    before = x.copy()
    result = transform.apply(x, ctx(datatype))
    out = result.array
    assert out.shape == x.shape and out.dtype == x.dtype and out.flags.c_contiguous
    lo, hi = bounds(datatype)
    assert as_float(out).min() >= lo and as_float(out).max() <= hi
    assert np.isfinite(as_float(out)).all()
    assert set(result.counts) == {name}
    assert result.counts[name] == int(np.count_nonzero(out != x))
    assert result.changed == result.counts[name]
    assert np.array_equal(x, before)  # the input is never modified


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_custom_float_range(name, layout):
    transform = TRANSFORMS[name](layout=layout, range=(-1.0, 1.0))
    x = random_image("FP32", layout, value_range=(-1.0, 1.0))
    out = transform.apply(x, ctx()).array
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.min() < 0.0  # the range is used, not [0, 1]


@pytest.mark.parametrize("name", TRANSFORMS)
def test_nan_inf_and_out_of_range_are_mapped_into_range(name):
    transform = TRANSFORMS[name]()
    x = random_image("FP32")
    x[0, 0, 0, :4] = [np.nan, np.inf, -np.inf, 7.0]
    x[1, 2, 3, 3] = -3.0
    out = transform.apply(x, ctx()).array
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", ["bit_depth", "median", "jpeg"])  # noise: drawn in memory order
def test_layouts_agree(name):
    """NHWC is NCHW transposed: the same image gives the same result in either layout."""
    x = random_image("FP32", "NCHW")
    out_nchw = TRANSFORMS[name](layout="NCHW").apply(x, ctx()).array
    out_nhwc = TRANSFORMS[name](layout="NHWC").apply(
        np.ascontiguousarray(x.transpose(0, 2, 3, 1)), ctx()).array
    np.testing.assert_array_equal(out_nhwc.transpose(0, 3, 1, 2), out_nchw)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_single_image_equals_batch_of_one(name):
    x = random_image("UINT8", "NHWC", n=1)
    transform = TRANSFORMS[name](layout="NHWC")
    batched = transform.apply(x, ctx("UINT8")).array
    single = transform.apply(x[0], ctx("UINT8")).array
    np.testing.assert_array_equal(single, batched[0])


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("shape", [(784,), (1, 784), (1, 1, 1, 28, 28)])
def test_non_image_ranks_are_rejected(name, shape):
    with pytest.raises(InputRejected, match=r"^input 'image': .*dimension"):
        TRANSFORMS[name]().apply(np.zeros(shape, np.float32), ctx())


@pytest.mark.parametrize("name", TRANSFORMS)
def test_other_dtypes_are_rejected(name):
    assert TRANSFORMS[name]().accepts == {"UINT8", "FP16", "FP32", "FP64", "BF16"}
    with pytest.raises(InputRejected, match="input 'image': .*got INT32"):
        TRANSFORMS[name]().apply(np.zeros((1, 1, 4, 4), np.int32), ctx("INT32"))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_empty_batch(name):
    result = TRANSFORMS[name]().apply(np.zeros((0, 3, 8, 8), np.float32), ctx())
    assert result.array.shape == (0, 3, 8, 8) and result.counts == {name: 0}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_thread_safe(name):
    transform = TRANSFORMS[name]()
    inputs = [(random_image("FP32", seed=i), f"req-{i}") for i in range(16)]
    expected = [transform.apply(x, ctx(request_id=r)).array for x, r in inputs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda item: transform.apply(item[0], ctx(request_id=item[1])).array,
                            inputs * 4))
    for index, out in enumerate(got):
        np.testing.assert_array_equal(out, expected[index % len(inputs)])


# --------------------------------------------------------------------------------------------
# Bit depth
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("datatype", ["UINT8", "FP32", "FP64"])
@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-2.0, 3.0)])
def test_bit_depth_1_gives_only_the_bounds(datatype, value_range):
    x = random_image(datatype, value_range=value_range)
    out = BitDepth(1, range=value_range).apply(x, ctx(datatype)).array
    lo, hi = bounds(datatype, value_range)
    assert set(np.unique(as_float(out))) == {lo, hi}
    # the threshold is the middle of the range
    middle = (lo + hi) / 2
    assert (out[as_float(x) < middle - 1e-6] == lo).all()
    assert (out[as_float(x) > middle + 1e-6] == hi).all()


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_bit_depth_levels_float(bits):
    x = random_image("FP64", n=4)
    out = BitDepth(bits).apply(x, ctx("FP64")).array
    levels = np.unique(out)
    assert len(levels) <= 2 ** bits
    np.testing.assert_allclose(levels * (2 ** bits - 1), np.rint(levels * (2 ** bits - 1)),
                               atol=1e-9)
    assert np.abs(out - x).max() <= 0.5 / (2 ** bits - 1) + 1e-12


def test_bit_depth_uint8_levels_and_identity():
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    out = BitDepth(2).apply(x, ctx("UINT8")).array
    assert set(np.unique(out)) == {0, 85, 170, 255}
    assert BitDepth(3).apply(x, ctx("UINT8")).array.max() == 255
    assert len(np.unique(BitDepth(3).apply(x, ctx("UINT8")).array)) == 8
    for bits in (8, 12, 16):  # 8 bits or more: a uint8 image is already squeezed
        result = BitDepth(bits).apply(x, ctx("UINT8"))
        np.testing.assert_array_equal(result.array, x)
        assert result.counts == {"bit_depth": 0}


def test_bit_depth_counts_only_changed_values():
    x = np.full((1, 1, 4, 4), 1 / 3, np.float64)  # on the 2-bit grid
    x[0, 0, 0, 0] = 0.4  # not on it
    result = BitDepth(2).apply(x, ctx("FP64"))
    assert result.counts == {"bit_depth": 1}


# --------------------------------------------------------------------------------------------
# Median
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_median_constant_image_is_identity(layout, datatype, k):
    value = 77 if datatype == "UINT8" else 0.3
    shape = (2, 3, 9, 9) if layout == "NCHW" else (2, 9, 9, 3)
    x = np.full(shape, value, DTYPES[datatype])
    result = Median(k, layout=layout).apply(x, ctx(datatype))
    np.testing.assert_array_equal(result.array, x)
    assert result.counts == {"median": 0}


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_median_removes_an_impulse_without_mixing_channels(layout):
    # Each channel (and image) has its own constant: a window over channels would mix them.
    x = np.zeros((2, 3, 9, 9), np.uint8)
    for n in range(2):
        for c in range(3):
            x[n, c] = 10 + 40 * c + 100 * n
    x[1, 2, 4, 4] = 0  # one impulse
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    result = Median(3, layout=layout).apply(x, ctx("UINT8"))
    assert result.counts == {"median": 1}
    assert result.array.max() == 190 and result.array[result.array > 0].min() == 10


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["UINT8", "FP32", "FP64"])
@pytest.mark.parametrize("hw", [(1, 1), (1, 5), (2, 2), (3, 7), (17, 16)])
def test_median_equals_scipy_median_filter(k, layout, dtype, hw):
    """The k=3 fast path (a sorting network) and the scipy path give scipy's exact result."""
    from scipy.ndimage import median_filter

    x = random_image(dtype, layout, n=2, c=3, h=hw[0], w=hw[1], seed=k)
    size = (1, 1, k, k) if layout == "NCHW" else (1, k, k, 1)
    expected = median_filter(x, size=size, mode="reflect")
    np.testing.assert_array_equal(Median(k, layout=layout).apply(x, ctx(dtype)).array, expected)
    single = Median(k, layout=layout).apply(x[0], ctx(dtype)).array
    np.testing.assert_array_equal(single, expected[0])


# --------------------------------------------------------------------------------------------
# JPEG
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_jpeg_q95_is_close_to_the_input(layout, channels):
    x = smooth_image(layout, c=channels)
    result = Jpeg(95, layout=layout).apply(x, ctx())
    error = np.abs(result.array - x)
    assert error.mean() < 1.5 / 255 and error.max() < 8 / 255
    assert result.counts["jpeg"] == int(np.count_nonzero(result.array != x))


def test_jpeg_lower_quality_loses_more():
    x = smooth_image() + np.random.default_rng(1).normal(0, 0.05, (2, 3, 32, 32))
    x = np.clip(x, 0, 1).astype(np.float32)
    errors = [np.abs(Jpeg(q).apply(x, ctx()).array - x).mean() for q in (95, 50, 10)]
    assert errors[0] < errors[1] < errors[2]


def test_jpeg_uint8_q95_and_grid_values():
    x = (smooth_image(c=3) * 255).round().astype(np.uint8)
    out = Jpeg(95).apply(x, ctx("UINT8")).array
    assert np.abs(out.astype(int) - x).mean() < 1.5
    # float inputs on the 1/255 grid give the uint8 result scaled
    out_float = Jpeg(95).apply(x.astype(np.float32) / 255, ctx()).array
    np.testing.assert_array_equal(np.rint(out_float * 255).astype(np.uint8), out)


def test_jpeg_rejects_images_beyond_its_size_limit():
    with pytest.raises(InputRejected, match=r"^input 'image': jpeg supports images up to 65500 "):
        Jpeg(50).apply(np.zeros((1, 1, 1, 65501), np.float32), ctx())


def test_jpeg_is_deterministic():
    x = random_image("FP32")
    a = Jpeg(30).apply(x, ctx(request_id="a")).array
    b = Jpeg(30).apply(x, ctx(request_id="b")).array
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("datatype", ["UINT8", "FP32", "FP64"])
def test_noise_reproducible_per_request(datatype):
    x = random_image(datatype)
    transform = Noise(8.0 if datatype == "UINT8" else 0.05)
    first = transform.apply(x, ctx(datatype, "req-1")).array
    again = transform.apply(x, ctx(datatype, "req-1")).array
    other_request = transform.apply(x, ctx(datatype, "req-2")).array
    other_input = transform.apply(x, ctx(datatype, "req-1", "mask")).array
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_request)
    assert not np.array_equal(first, other_input)
    # another instance with the same options gives the same noise (no instance state)
    np.testing.assert_array_equal(Noise(transform.sigma).apply(x, ctx(datatype, "req-1")).array,
                                  first)


def test_noise_seed_is_a_stable_hash():
    # sha256-based: the same in every process (Python's hash() is salted per process).
    assert image.noise_seed("req-1", "image") == image.noise_seed("req-1", "image")
    assert image.noise_seed("ab", "c") != image.noise_seed("a", "bc")
    import hashlib
    expected = int.from_bytes(hashlib.sha256(b"req-1\x00image").digest()[:8], "little")
    assert image.noise_seed("req-1", "image") == expected


@pytest.mark.parametrize("sigma", [0.01, 0.05])
def test_noise_statistics(sigma):
    x = np.full((16, 3, 32, 32), 0.5, np.float32)  # far from the bounds: no clipping
    noise = Noise(sigma).apply(x, ctx()).array.astype(np.float64) - 0.5
    n = noise.size
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(n)
    assert abs(noise.std() / sigma - 1) < 0.03


def test_noise_is_clipped_and_uint8_is_integer():
    x = np.zeros((2, 1, 16, 16), np.uint8)
    x[1] = 255
    out = Noise(20.0).apply(x, ctx("UINT8")).array
    assert out.dtype == np.uint8
    assert (out[0] > 0).any() and (out[1] < 255).any()
    xf = np.ones((2, 1, 16, 16), np.float32)
    outf = Noise(0.5).apply(xf, ctx()).array
    assert outf.max() == 1.0 and outf.min() >= 0.0


# --------------------------------------------------------------------------------------------
# Options and registration
# --------------------------------------------------------------------------------------------

STAGES = {
    "transform.bit_depth": ("bits", 4, BitDepth, False),
    "transform.median": ("k", 3, Median, True),
    "transform.jpeg": ("quality", 75, Jpeg, True),
    "transform.noise": ("sigma", 0.1, Noise, False),
}


@pytest.mark.parametrize("name", STAGES)
def test_stage_registered_and_built(name):
    key, value, cls, offload = STAGES[name]
    spec = stage_catalog.registry()[name]
    assert spec.kind == "transform" and spec.offload is offload
    options = spec.options.model_validate({key: value, "layout": "NHWC", "range": [-1, 1]})
    transform = spec.build(options)
    assert isinstance(transform, cls)
    assert transform.layout == "NHWC" and transform.range == (-1.0, 1.0)
    defaults = spec.build(spec.options.model_validate({key: value}))
    assert defaults.layout == "NCHW" and defaults.range == (0.0, 1.0)


@pytest.mark.parametrize("name, options, message", [
    ("transform.bit_depth", {"bits": 0}, "bits must be an integer from 1 to 16"),
    ("transform.bit_depth", {"bits": 17}, "bits must be an integer from 1 to 16"),
    ("transform.bit_depth", {"bits": 2.5}, "bits"),
    ("transform.bit_depth", {}, "bits"),
    ("transform.median", {"k": 1}, "k .* must be an integer >= 2"),
    ("transform.median", {"k": "3"}, "k"),
    ("transform.jpeg", {"quality": 0}, "quality must be an integer from 1 to 95"),
    ("transform.jpeg", {"quality": 96}, "quality must be an integer from 1 to 95"),
    ("transform.noise", {"sigma": 0}, "sigma must be a finite number > 0"),
    ("transform.noise", {"sigma": -0.1}, "sigma must be a finite number > 0"),
    ("transform.noise", {"sigma": float("inf")}, "sigma must be a finite number > 0"),
    ("transform.noise", {"sigma": 0.1, "layout": "CHW"}, "layout"),
    ("transform.noise", {"sigma": 0.1, "range": [1, 0]}, "range must be .* lo < hi"),
    ("transform.noise", {"sigma": 0.1, "range": [0, 0]}, "range must be .* lo < hi"),
    ("transform.noise", {"sigma": 0.1, "range": [0, 1, 2]}, "range"),
    ("transform.noise", {"sigma": 0.1, "seed": 3}, "seed"),
])
def test_bad_options(name, options, message):
    with pytest.raises(ValueError, match=message) as info:
        stage_catalog.registry()[name].options.model_validate(options)
    assert isinstance(info.value, ValidationError)


def test_missing_optional_dependency_is_a_config_error(monkeypatch):
    import sys
    spec = stage_catalog.registry()["transform.jpeg"]
    options = spec.options.model_validate({"quality": 50})
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # import fails
    with pytest.raises(ValueError, match="transform.jpeg needs the pillow package"):
        spec.build(options)


def test_constructors_check_options_too():
    with pytest.raises(ValueError, match="bits"):
        BitDepth(0)
    with pytest.raises(ValueError, match="range"):
        Noise(0.1, range=(1.0, 0.0))
