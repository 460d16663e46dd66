"""Parity of bastion.transforms.image with IBM ART's preprocessors (the reference semantics).

Needs ART, which is not a runtime dependency of Bastion and installs without any framework:

    pip install adversarial-robustness-toolbox==1.20.1

(pulls only ART itself plus numpy/scipy/scikit-learn/six/tqdm; Pillow must be present for JPEG).
It is in the `test` extra, so CI always runs these; without it the module fails to import
(loudly, never skipped). Any difference fails.

What is compared, and how exactly:

* FeatureSqueezing(clip_values, bit_depth)       == ours, bit for bit (FP32, FP64); UINT8: ours
  == rint(ART) (ART returns floats, we round to integer levels).
* SpatialSmoothing(window_size, channels_first)  == ours, bit for bit (UINT8, FP32, even k too).
* JpegCompression(clip_values, quality, channels_first) == ours, bit for bit, for UINT8 with
  clip_values (0, 255) and for FP32/FP64 in [0, 1] on the 1/255 grid (or wherever ``x * 255``
  truncates and rounds to the same integer: ART truncates, we round). For arbitrary float
  inputs ours equals ART applied to the input rounded to the 1/255 grid; the difference from
  plain ART is up to ~2.4/255 on average (white noise; ~0.6-1.5/255 on smooth images) and
  ART's output is darker by ~0.5/255 on average while ours is unbiased.
* GaussianAugmentation(sigma, augmentation=False, clip_values): statistics of the noise (mean,
  std, two-sample Kolmogorov-Smirnov test); ART draws from np.random, we from a per-request seed.
"""
from __future__ import annotations

import numpy as np
import pytest

import art  # noqa: E402
from art.defences.preprocessor import (FeatureSqueezing, GaussianAugmentation,  # noqa: E402
                                       JpegCompression, SpatialSmoothing)

from bastion.transforms.base import TransformContext  # noqa: E402
from bastion.transforms.image import BitDepth, Jpeg, Median, Noise  # noqa: E402

LAYOUTS = {"NCHW": True, "NHWC": False}  # layout -> ART channels_first


def ctx(datatype="FP32", request_id="req-1"):
    return TransformContext(request_id, "image", datatype)


def images(layout, dtype, n=4, c=3, h=20, w=18, seed=0, value_range=(0.0, 1.0)):
    rng = np.random.default_rng(seed)
    shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    lo, hi = value_range
    return (lo + (hi - lo) * rng.random(shape)).astype(dtype)


def test_art_version_reported():
    # Parity was established against this version; a newer ART that differs fails below.
    print("ART", art.__version__)
    assert art.__version__


# --- FeatureSqueezing -------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize("dtype, value_range", [(np.float32, (0.0, 1.0)),
                                                (np.float64, (0.0, 1.0)),
                                                (np.float32, (-1.0, 1.0)),
                                                (np.float64, (-0.5, 2.0))])
def test_bit_depth_matches_feature_squeezing(bits, dtype, value_range):
    x = images("NCHW", dtype, value_range=value_range)
    expected, _ = FeatureSqueezing(clip_values=value_range, bit_depth=bits)(x)
    ours = BitDepth(bits, range=value_range).apply(x, ctx()).array
    np.testing.assert_array_equal(ours, expected.astype(dtype))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_bit_depth_uint8_matches_rounded_feature_squeezing(bits):
    x = images("NHWC", np.uint8)
    expected, _ = FeatureSqueezing(clip_values=(0, 255), bit_depth=bits)(x)
    ours = BitDepth(bits, layout="NHWC").apply(x, ctx("UINT8")).array
    np.testing.assert_array_equal(ours, np.rint(expected).astype(np.uint8))
    assert np.abs(ours - expected).max() <= 0.5


# --- SpatialSmoothing -------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_median_matches_spatial_smoothing(k, layout, dtype, channels):
    x = images(layout, dtype, c=channels)
    expected, _ = SpatialSmoothing(window_size=k, channels_first=LAYOUTS[layout])(x)
    datatype = {np.uint8: "UINT8", np.float32: "FP32", np.float64: "FP64"}[dtype]
    ours = Median(k, layout=layout).apply(x, ctx(datatype)).array
    assert ours.dtype == expected.dtype
    np.testing.assert_array_equal(ours, expected)


# --- JpegCompression --------------------------------------------------------------------------

@pytest.mark.parametrize("quality", [5, 50, 75, 95])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_uint8_matches_jpeg_compression(quality, layout, channels):
    x = images(layout, np.uint8, c=channels, h=24, w=16)
    expected, _ = JpegCompression(clip_values=(0, 255), quality=quality,
                                  channels_first=LAYOUTS[layout])(x)
    ours = Jpeg(quality, layout=layout).apply(x, ctx("UINT8")).array
    np.testing.assert_array_equal(ours, expected.astype(np.uint8))


@pytest.mark.parametrize("quality", [10, 50, 95])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_float_matches_when_truncation_equals_rounding(quality, layout, channels):
    # (k + 0.25) / 255: ART's astype(uint8) truncation and our rint both give k.
    k = images(layout, np.uint8, c=channels)
    x = ((k.astype(np.float64) + 0.25) / 255).astype(np.float32)
    expected, _ = JpegCompression(clip_values=(0.0, 1.0), quality=quality,
                                  channels_first=LAYOUTS[layout])(x)
    ours = Jpeg(quality, layout=layout).apply(x, ctx()).array
    np.testing.assert_array_equal(ours, expected.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jpeg_float_on_the_grid_matches(dtype):
    # k / 255 exactly: ART's truncation of x * 255 gives k for float32 and float64.
    x = (images("NHWC", np.uint8) / 255).astype(dtype)
    expected, _ = JpegCompression(clip_values=(0.0, 1.0), quality=50, channels_first=False)(x)
    ours = Jpeg(50, layout="NHWC").apply(x, ctx("FP32" if dtype == np.float32 else "FP64")).array
    assert ours.dtype == dtype
    # ART always returns float32 (ART_NUMPY_DTYPE); ours keeps float64 precision
    np.testing.assert_array_equal(ours.astype(np.float32), expected)


@pytest.mark.parametrize("quality", [10, 50, 95])
def test_jpeg_float_arbitrary_values(quality):
    x = images("NCHW", np.float32)
    ours = Jpeg(quality).apply(x, ctx()).array
    # The one difference is how the input becomes uint8: ours rounds, ART truncates.
    grid = ((np.rint(x * 255) + 0.25) / 255).astype(np.float32)
    on_grid, _ = JpegCompression(clip_values=(0.0, 1.0), quality=quality, channels_first=True)(grid)
    np.testing.assert_array_equal(ours, on_grid.astype(np.float32))
    plain, _ = JpegCompression(clip_values=(0.0, 1.0), quality=quality, channels_first=True)(x)
    # Measured with ART 1.20.1 / Pillow 13 on these white-noise images: mean |ours - ART| is
    # 1.8-2.4 levels (JPEG spreads a one-level input difference over the 8x8 block).
    assert np.abs(ours - plain).mean() < 3 / 255
    # ART's truncation darkens by half a level on average; rounding does not
    assert np.mean(ours - x) > np.mean(plain - x)


# --- GaussianAugmentation ---------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1])
def test_noise_statistics_match_gaussian_augmentation(sigma):
    from scipy.stats import ks_2samp

    x = np.full((8, 3, 32, 32), 0.5, np.float32)  # 5 sigma from the bounds: clipping is rare
    np.random.seed(1234)
    art_out, _ = GaussianAugmentation(sigma=sigma, augmentation=False, clip_values=(0.0, 1.0))(x)
    ours = Noise(sigma).apply(x, ctx(request_id="parity")).array
    art_noise = art_out.astype(np.float64).ravel() - 0.5
    our_noise = ours.astype(np.float64).ravel() - 0.5
    n = our_noise.size
    for noise in (art_noise, our_noise):
        assert abs(noise.mean()) < 5 * sigma / np.sqrt(n)
        assert abs(noise.std() / sigma - 1) < 0.03
    assert abs(our_noise.std() - art_noise.std()) / sigma < 0.04
    assert ks_2samp(art_noise, our_noise).pvalue > 1e-3
    assert art_out.min() >= 0.0 and art_out.max() <= 1.0
    assert ours.min() >= 0.0 and ours.max() <= 1.0
