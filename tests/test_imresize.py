"""MATLAB-compatible bicubic imresize: an independent slow oracle, hand-computed values, numpy vs torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
import torch

from samdiffsr.imresize import imresize, imresize_torch

# Scales whose weights are dyadic fractions: the float64 arithmetic is exact, so uint8 results (rounding
# included) must agree bit for bit with any correct implementation, whatever its summation order.
DYADIC_SCALES = [0.25, 0.5, 2.0, 4.0]
OTHER_SCALES = [0.3, 0.77, 1.7, 3.0]


def keys_cubic(t: float) -> float:
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t <= 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def reflect(j: int, n: int) -> int:
    """1-based coordinate ``j`` (possibly outside 1..n) -> 0-based index, mirrored with the edge repeated."""
    while j < 1 or j > n:
        j = 1 - j if j < 1 else 2 * n + 1 - j
    return j - 1


def oracle_line(line: list[float], out_len: int, scale: float) -> list[float]:
    """MATLAB's documented resampling of one line, evaluated pixel by pixel over every nonzero tap."""
    stretch = 1 / scale if scale < 1 else 1.0
    result = []
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        taps = []
        for j in range(math.floor(u - 2 * stretch) - 1, math.ceil(u + 2 * stretch) + 2):
            w = keys_cubic((u - j) / stretch) / stretch
            if w != 0:
                taps.append((w, reflect(j, len(line))))
        total = sum(w for w, _ in taps)
        result.append(sum(w / total * line[i] for w, i in taps))
    return result


def oracle(img: np.ndarray, out_shape: tuple[int, int], scales: tuple[float, float]) -> np.ndarray:
    """Slow 2-D oracle: the smaller-scale axis first; uint8 rounded half up after each axis."""
    is_uint8 = img.dtype == np.uint8
    data = img.astype(np.float64)
    if data.ndim == 2:
        data = data[:, :, None]
    for axis in sorted((0, 1), key=lambda a: scales[a]):
        moved = np.moveaxis(data, axis, 0)
        out = np.empty((out_shape[axis],) + moved.shape[1:])
        for idx in np.ndindex(*moved.shape[1:]):
            line = [float(v) for v in moved[(slice(None),) + idx]]
            out[(slice(None),) + idx] = oracle_line(line, out_shape[axis], scales[axis])
        if is_uint8:
            out = np.floor(np.clip(out, 0, 255) + 0.5)
        data = np.moveaxis(out, 0, axis)
    data = data.reshape(out_shape + img.shape[2:])
    return data.astype(np.uint8) if is_uint8 else data


def photo(name: str) -> np.ndarray:
    return np.ascontiguousarray(getattr(skimage.data, name)())


@pytest.mark.parametrize("scale", DYADIC_SCALES)
@pytest.mark.parametrize("shape", [(13, 9, 3), (20, 17), (6, 41, 2)])
def test_uint8_matches_oracle_exactly(shape, scale):
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    out_shape = (math.ceil(scale * shape[0]), math.ceil(scale * shape[1]))
    got = imresize(img, scale)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, oracle(img, out_shape, (scale, scale)))


@pytest.mark.parametrize("scale", DYADIC_SCALES + OTHER_SCALES)
def test_float_matches_oracle(scale):
    img = np.random.default_rng(7).random((11, 14, 3))
    out_shape = (math.ceil(scale * 11), math.ceil(scale * 14))
    got = imresize(img, scale)
    assert got.dtype == np.float64 and got.shape == out_shape + (3,)
    np.testing.assert_allclose(got, oracle(img, out_shape, (scale, scale)), rtol=0, atol=1e-12)


def test_output_shape_uses_per_axis_scales_and_order():
    # 15 -> 4 rows (scale 4/15) and 7 -> 20 cols (scale 20/7): rows are resized first.
    img = np.random.default_rng(3).random((15, 7))
    got = imresize(img, output_shape=(4, 20))
    np.testing.assert_allclose(got, oracle(img, (4, 20), (4 / 15, 20 / 7)), rtol=0, atol=1e-12)
    # With the columns shrinking more, the column pass comes first; uint8 rounding makes order visible.
    img8 = np.random.default_rng(4).integers(0, 256, (9, 32), dtype=np.uint8)
    np.testing.assert_array_equal(imresize(img8, output_shape=(18, 8)), oracle(img8, (18, 8), (2.0, 0.25)))


def test_hand_computed_quarter_scale():
    # Scale 1/4: output pixel x sits at input u = 4x - 1.5 (1-based), taps at distances 1/2, 3/2, ..., 15/2
    # weighted cubic(d / 4) / 4. cubic(k/8) for k = 1, 3, ..., 15 is below (exact, /1024).
    cubic_k8 = dict(zip(range(1, 16, 2), [987, 745, 399, 93, -49, -75, -45, -7], strict=True))
    weights = [cubic_k8[k] / 4096 for k in (15, 13, 11, 9, 7, 5, 3, 1, 1, 3, 5, 7, 9, 11, 13, 15)]
    # 0-based sources of taps j = -5..10 and j = -1..14, mirrored about the edges (edge pixel repeated).
    sources = [
        [5, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 6],
        [1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2],
    ]
    ramp = np.arange(0, 80, 10, dtype=np.float64)[None, :]  # 1 x 8; the single row passes unchanged
    expected = [sum(w * ramp[0, i] for w, i in zip(weights, src, strict=True)) for src in sources]
    assert expected == [7045 / 512, 28795 / 512]  # 13.759765625, 56.240234375
    np.testing.assert_array_equal(imresize(ramp, 0.25), [expected])
    np.testing.assert_array_equal(imresize(ramp.astype(np.uint8), 0.25), [[14, 56]])
    column = np.ascontiguousarray(ramp.T)  # the same along the other axis
    np.testing.assert_array_equal(imresize(column, 0.25), np.array([expected]).T)


def test_ties_round_half_away_from_zero():
    # At scale 2 the weights are dyadic: many outputs are exactly k + 0.5, and MATLAB rounds them up.
    img = np.random.default_rng(0).integers(0, 256, (1, 400), dtype=np.uint8)
    exact = imresize(img.astype(np.float64), 2.0)
    ties = exact - np.floor(exact) == 0.5
    even_ties = ties & (np.floor(exact) % 2 == 0) & (exact > 0) & (exact < 255)
    assert even_ties.sum() > 5, "the test needs ties that half-to-even rounding would send down"
    got = imresize(img, 2.0)
    np.testing.assert_array_equal(got[ties], np.floor(exact[ties]) + 1)


def test_uint8_rounds_after_each_axis():
    img = photo("chelsea")
    once = imresize(img, 0.25)
    float_then_round = np.floor(np.clip(imresize(img.astype(np.float64), 0.25), 0, 255) + 0.5)
    diff = np.abs(once.astype(int) - float_then_round.astype(int))
    assert diff.max() == 1 and diff.any(), "intermediate rounding changes some pixels by exactly 1"


@pytest.mark.parametrize("scale", [0.25, 0.3, 1.7, 4.0])
def test_constant_image_stays_constant(scale):
    for value, dtype in [(173, np.uint8), (0.37, np.float32), (-2.5, np.float64)]:
        img = np.full((23, 18, 3), value, dtype=dtype)
        got = imresize(img, scale)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, value, rtol=1e-6)
        got_t = imresize_torch(torch.from_numpy(img).permute(2, 0, 1), scale)
        np.testing.assert_allclose(got_t.numpy(), value, rtol=1e-6)


@pytest.mark.parametrize(
    "size, scale, expected",
    [((13, 7), 0.25, (4, 2)), ((17, 11), 0.3, (6, 4)), ((7, 9), 2.5, (18, 23)), ((1, 5), 0.5, (1, 3))],
)
def test_output_size_is_ceil(size, scale, expected):
    assert imresize(np.zeros(size, np.uint8), scale).shape == expected
    assert imresize_torch(torch.zeros((2, 3) + size), scale).shape == (2, 3) + expected


def test_dtypes_and_errors():
    img = np.zeros((8, 8), np.float32)
    assert imresize(img, 0.5).dtype == np.float32
    assert imresize_torch(torch.zeros(1, 8, 8, dtype=torch.bfloat16), 0.5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img, 0.5, output_shape=(4, 4))
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)
    with pytest.raises(ValueError, match="positive"):
        imresize(img, -1.0)
    with pytest.raises(TypeError, match="uint8"):
        imresize(img.astype(np.int32), 0.5)
    with pytest.raises(TypeError, match="uint8"):
        imresize_torch(torch.zeros(4, 4, dtype=torch.int64), 0.5)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket"])
@pytest.mark.parametrize("scale", [0.25, 0.3, 4.0])
def test_torch_matches_numpy_on_photos(name, scale):
    img = photo(name)
    if scale > 1:
        img = np.ascontiguousarray(img[100:140, 200:240])
    chw = torch.from_numpy(img).permute(2, 0, 1)
    got8 = imresize_torch(chw, scale).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got8, imresize(img, scale))
    img32 = img.astype(np.float32) / 255
    got32 = imresize_torch(torch.from_numpy(img32).permute(2, 0, 1), scale).permute(1, 2, 0).numpy()
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, imresize(img32, scale), rtol=0, atol=1e-5)


def test_torch_batched_equals_single_and_float64_exact():
    rng = np.random.default_rng(1)
    batch = rng.random((5, 3, 40, 36))
    got = imresize_torch(torch.from_numpy(batch), 4.0)
    assert got.shape == (5, 3, 160, 144) and got.dtype == torch.float64
    for b in range(5):
        expected = imresize(batch[b].transpose(1, 2, 0), 4.0).transpose(2, 0, 1)
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(got[b].numpy(), imresize_torch(torch.from_numpy(batch[b]), 4.0).numpy())


def test_torch_is_differentiable():
    x = torch.rand(2, 3, 10, 10, requires_grad=True)
    imresize_torch(x, 4.0).sum().backward()
    # Each output row/column of weights sums to 1, so d(sum)/dx is each input's total weight: 4 x 4 = 16.
    np.testing.assert_allclose(x.grad.sum().item(), 16 * x.numel(), rtol=1e-5)
