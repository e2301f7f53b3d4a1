"""decode / fit_frame / normalize / preprocess / encode_image_fields against hand-built images.

Messages are plain objects here (decode reads fields only); one test builds a real rclpy
``sensor_msgs/Image`` and a real ``rosbags`` one and checks both decode alike.
"""

from __future__ import annotations

import array
import resource
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from bagfactory import zero_png
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from malpi_ros.config import PreprocessConfig
from malpi_ros.errors import ConfigError, DecodeError
from malpi_ros.runtime.frame_size import compressed_size
from malpi_ros.runtime.image import (
    ENCODINGS,
    decode,
    encode_image_fields,
    fit_frame,
    normalize,
    preprocess,
)

PAD = 0xAB  # padding bytes: visible if a decoder reads them as pixels


def image_msg(encoding, height, width, data, step=None, is_bigendian=False):
    if step is None:
        step = len(data) // height if height else 0
    return SimpleNamespace(
        encoding=encoding,
        height=height,
        width=width,
        step=step,
        is_bigendian=is_bigendian,
        data=data,
    )


def padded(rows: np.ndarray, extra: int) -> tuple[bytes, int]:
    """Bytes of a (H, row_bytes) uint8 array with ``extra`` padding bytes after every row."""
    height = rows.shape[0]
    pad = np.full((height, extra), PAD, np.uint8)
    full = np.concatenate([rows.reshape(height, -1), pad], axis=1)
    return full.tobytes(), full.shape[1]


def random_rgb(height=4, width=6, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- raw encodings ------------------------------------------------------------------------


@pytest.mark.parametrize('extra', [0, 3])
def test_rgb8_and_bgr8_with_and_without_row_padding(extra):
    rgb = random_rgb()
    data, step = padded(rgb, extra)
    np.testing.assert_array_equal(decode(image_msg('rgb8', 4, 6, data, step)), rgb)
    data, step = padded(np.ascontiguousarray(rgb[..., ::-1]), extra)
    out = decode(image_msg('bgr8', 4, 6, data, step))
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, rgb)


def test_rgb8_without_padding_is_a_view_of_the_message_data():
    rgb = random_rgb()
    buf = bytearray(rgb.tobytes())
    out = decode(image_msg('rgb8', 4, 6, buf))
    assert np.shares_memory(out, np.frombuffer(buf, np.uint8))
    rclpy_like = array.array('B', rgb.tobytes())
    assert np.shares_memory(
        decode(image_msg('rgb8', 4, 6, rclpy_like)), np.frombuffer(rclpy_like, np.uint8)
    )


@pytest.mark.parametrize(
    'make_data',
    [
        bytes,
        bytearray,
        memoryview,
        lambda b: array.array('B', b),
        lambda b: np.frombuffer(b, np.uint8),
    ],
    ids=['bytes', 'bytearray', 'memoryview', 'array', 'numpy'],
)
def test_every_kind_of_data_buffer_decodes_alike(make_data):
    rgb = random_rgb(seed=3)
    data, step = padded(rgb, 2)
    np.testing.assert_array_equal(decode(image_msg('rgb8', 4, 6, make_data(data), step)), rgb)


@pytest.mark.parametrize('extra', [0, 5])
def test_rgba8_and_bgra8_keep_colour_order_and_drop_alpha(extra):
    # One pixel per row with distinct channel values: R=10, G=20, B=30, A=40.
    rgba = np.array([[[10, 20, 30, 40]], [[50, 60, 70, 80]]], np.uint8)
    data, step = padded(rgba, extra)
    out = decode(image_msg('rgba8', 2, 1, data, step))
    np.testing.assert_array_equal(out, [[[10, 20, 30]], [[50, 60, 70]]])
    bgra = rgba[..., [2, 1, 0, 3]]
    data, step = padded(np.ascontiguousarray(bgra), extra)
    out = decode(image_msg('bgra8', 2, 1, data, step))
    np.testing.assert_array_equal(out, [[[10, 20, 30]], [[50, 60, 70]]])


def test_mono8_with_padding_repeats_grey_into_three_channels():
    grey = np.array([[0, 7, 255], [128, 1, 2]], np.uint8)
    data, step = padded(grey, 1)
    out = decode(image_msg('mono8', 2, 3, data, step))
    assert out.shape == (2, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


MONO16 = np.array([[0, 128, 129, 255, 256, 257], [1000, 32767, 32768, 65279, 65534, 65535]])


@pytest.mark.parametrize('big', [False, True])
@pytest.mark.parametrize('extra', [0, 1])  # 1: an odd step, every other row starts unaligned
def test_mono16_both_byte_orders_scale_like_cv_bridge(big, extra):
    values = MONO16.astype('>u2' if big else '<u2')
    rows = values.view(np.uint8).reshape(2, -1)
    data, step = padded(rows, extra)
    out = decode(image_msg('mono16', 2, 6, data, step, is_bigendian=big))
    assert out.shape == (2, 6, 3) and out.dtype == np.uint8
    # cv_bridge: Mat::convertTo(CV_8U, 255/65535), which convertScaleAbs reproduces here.
    expected = cv2.convertScaleAbs(MONO16.astype(np.uint16), alpha=255.0 / 65535.0)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], np.rint(MONO16 * 255.0 / 65535.0))
    # Rounding, not the high byte: 255 -> 1 (>>8 would give 0), 65535 -> 255, 128 -> 0.
    assert out[0, 3, 0] == 1 and out[1, 5, 0] == 255 and out[0, 1, 0] == 0
    np.testing.assert_array_equal(out[..., 1], out[..., 2])


def test_mono16_byte_order_matters():
    value = np.array([[0x0102]], '<u2')
    little = decode(image_msg('mono16', 1, 1, value.tobytes(), 2, is_bigendian=False))
    big = decode(image_msg('mono16', 1, 1, value.tobytes(), 2, is_bigendian=True))
    assert little[0, 0, 0] == round(0x0102 / 257) and big[0, 0, 0] == round(0x0201 / 257)


# (Y, U, V) of grey and pure colours in BT.601 limited range, and the RGB they stand for.
YUV_COLOURS = {
    'white': ((235, 128, 128), (255, 255, 255)),
    'black': ((16, 128, 128), (0, 0, 0)),
    'grey': ((126, 128, 128), (128, 128, 128)),
    'red': ((81, 90, 240), (255, 0, 0)),
    'green': ((145, 54, 34), (0, 255, 0)),
    'blue': ((41, 240, 110), (0, 0, 255)),
}


def yuv_bytes(pairs, order: str) -> np.ndarray:
    """A (1, 2*len(pairs)) image, two pixels per (Y, U, V), as (1, 4*len) bytes in ``order``."""
    out = []
    for y, u, v in pairs:
        out += [u, y, v, y] if order == 'uyvy' else [y, u, y, v]
    return np.array([out], np.uint8)


@pytest.mark.parametrize(
    ('encoding', 'order', 'code'),
    [
        ('yuv422', 'uyvy', cv2.COLOR_YUV2RGB_UYVY),
        ('uyvy', 'uyvy', cv2.COLOR_YUV2RGB_UYVY),
        ('yuv422_yuy2', 'yuyv', cv2.COLOR_YUV2RGB_YUY2),
        ('yuyv', 'yuyv', cv2.COLOR_YUV2RGB_YUY2),
    ],
)
@pytest.mark.parametrize('extra', [0, 2])
def test_yuv422_both_orders_give_known_colours(encoding, order, code, extra):
    names = list(YUV_COLOURS)
    raw = yuv_bytes([YUV_COLOURS[n][0] for n in names], order)
    rows = np.concatenate([raw, raw[:, ::-1].copy()])  # a second, different row
    data, step = padded(rows, extra)
    width = 2 * len(names)
    out = decode(image_msg(encoding, 2, width, data, step))
    assert out.shape == (2, width, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.cvtColor(rows.reshape(2, width, 2), code))
    for i, name in enumerate(names):
        expected = np.array(YUV_COLOURS[name][1])
        for pixel in (out[0, 2 * i], out[0, 2 * i + 1]):
            assert np.abs(pixel.astype(int) - expected).max() <= 2, (name, pixel)


def test_yuv_orders_are_not_interchangeable():
    raw = yuv_bytes([YUV_COLOURS['red'][0]], 'uyvy')
    right = decode(image_msg('yuv422', 1, 2, raw.tobytes()))
    wrong = decode(image_msg('yuv422_yuy2', 1, 2, raw.tobytes()))
    assert np.abs(right.astype(int) - wrong.astype(int)).max() > 50


# --- bad raw messages ---------------------------------------------------------------------


BAD = [
    # (encoding, height, width, step, data length, words the message must contain)
    ('bayer_rggb8', 2, 3, 3, 6, 'unsupported encoding'),
    ('RGB8', 2, 3, 9, 18, 'unsupported encoding'),
    ('', 2, 3, 9, 18, 'unsupported encoding'),
    ('rgb8', 2, 3, 9, 17, 'shorter'),
    ('mono16', 4, 3, 6, 23, 'shorter'),
    ('rgb8', 2, 3, 8, 18, 'step is smaller'),
    ('mono16', 2, 3, 5, 10, 'step is smaller'),
    ('rgb8', 2, 0, 0, 0, 'empty'),
    ('mono8', 0, 3, 3, 0, 'empty'),
    ('yuv422', 2, 3, 6, 12, 'even width'),
    ('yuv422_yuy2', 1, 1, 2, 2, 'even width'),
    ('rgb8', -1, 3, 9, 9, 'height must be'),
]


@pytest.mark.parametrize(('encoding', 'height', 'width', 'step', 'size', 'why'), BAD)
def test_bad_messages_raise_decode_error_naming_encoding_and_sizes(
    encoding, height, width, step, size, why
):
    msg = image_msg(encoding, height, width, bytes(size), step)
    with pytest.raises(DecodeError) as err:
        decode(msg)
    text = str(err.value)
    assert why in text
    assert repr(encoding) in text
    assert f'{width}x{height}' in text and f'step {step}' in text and f'{size} data bytes' in text


@pytest.mark.parametrize(
    'data', [None, 'abc', [1, 2, 3], np.zeros(18, np.float32)], ids=['none', 'str', 'list', 'f32']
)
def test_data_that_is_not_a_byte_buffer_raises_decode_error(data):
    with pytest.raises(DecodeError, match="'rgb8'"):
        decode(image_msg('rgb8', 2, 3, data, 9))


def test_an_object_without_image_fields_raises_decode_error():
    with pytest.raises(DecodeError, match='not an image message'):
        decode(SimpleNamespace(data=b'123'))


ENCODING_NAMES = st.sampled_from([*ENCODINGS, 'bayer_rggb8', '16UC1', 'RGB8', 'nv12', ''])
PIXEL_BYTES = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono16': 2, 'mono8': 1}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    encoding=st.one_of(ENCODING_NAMES, ENCODING_NAMES, ENCODING_NAMES, st.text(max_size=8)),
    height=st.one_of(st.integers(1, 6), st.integers(0, 6)),
    width=st.one_of(st.integers(1, 6), st.integers(0, 6)),
    # Mostly near the right layout (so many messages are valid), sometimes anything.
    step_delta=st.one_of(st.integers(0, 5), st.integers(-3, 5), st.none()),
    size_delta=st.one_of(st.integers(0, 5), st.integers(-3, 5), st.none()),
    big=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decode_returns_rgb_or_raises_decode_error_only(
    encoding, height, width, step_delta, size_delta, big, seed
):
    rng = np.random.default_rng(seed)
    row = width * PIXEL_BYTES.get(encoding, 2)
    step = int(rng.integers(0, 40)) if step_delta is None else max(row + step_delta, 0)
    size = int(rng.integers(0, 300)) if size_delta is None else max(step * height + size_delta, 0)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    msg = image_msg(encoding, height, width, data, step, is_bigendian=big)
    try:
        out = decode(msg)
    except DecodeError:
        event('DecodeError')
        return
    event('decoded')
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8 and out.shape == (height, width, 3)


# --- compressed ---------------------------------------------------------------------------


def smooth_rgb(height=24, width=32) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 4], axis=-1).astype(np.uint8)


def compressed(rgb: np.ndarray, ext: str, fmt: str) -> SimpleNamespace:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return SimpleNamespace(format=fmt, data=buf.tobytes())


@pytest.mark.parametrize('fmt', ['png', 'rgb8; png compressed bgr8', 'jpeg'])  # by content
def test_png_round_trip_is_exact(fmt):
    rgb = smooth_rgb()
    np.testing.assert_array_equal(decode(compressed(rgb, '.png', fmt)), rgb)


@pytest.mark.parametrize('fmt', ['jpeg', 'rgb8; jpeg compressed bgr8', ''])
def test_jpeg_round_trip_is_close(fmt):
    rgb = smooth_rgb()
    msg = compressed(rgb, '.jpg', fmt)
    msg.data = np.frombuffer(msg.data, np.uint8)  # as rosbags hands it over
    out = decode(msg)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 4


def test_grey_png_decodes_to_three_channels():
    grey = smooth_rgb()[..., 0]
    _, buf = cv2.imencode('.png', grey)
    out = decode(SimpleNamespace(format='png', data=buf.tobytes()))
    assert out.shape == (*grey.shape, 3)
    np.testing.assert_array_equal(out[..., 1], grey)


def test_corrupt_or_empty_compressed_data_raises_decode_error():
    good = compressed(smooth_rgb(), '.png', 'png').data
    bad = [b'', b'not an image at all', b'\x00' * 64, b'\x89PNG' + good[4:20]]
    for data in bad:
        with pytest.raises(DecodeError) as err:
            decode(SimpleNamespace(format='png', data=data))
        assert "'png'" in str(err.value) and f'{len(data)} bytes' in str(err.value)


# --- bounded decoding (frame_size) --------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): what a decode could have pushed up."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_png_bomb_is_refused_from_its_header_fast_and_without_memory():
    bomb = zero_png(20000, 20000)  # ~390 KB, 400 Mpx
    assert len(bomb) < 500_000
    before = peak_rss_mb()
    start = time.perf_counter()
    with pytest.raises(DecodeError) as err:
        decode(SimpleNamespace(format='png', data=bomb))
    assert time.perf_counter() - start < 0.1
    assert peak_rss_mb() - before < 50
    assert '20000x20000 = 400000000 pixels is over the limit of 16777216' in str(err.value)
    assert 'max_frame_pixels' in str(err.value)


@pytest.mark.parametrize('ext', ['.png', '.jpg'])
def test_compressed_header_sizes_are_opencvs_and_the_limit_is_inclusive(ext):
    rgb = smooth_rgb(24, 32)
    msg = compressed(rgb, ext, 'any')
    assert compressed_size(msg.data)[1:] == (32, 24)
    assert decode(msg, max_pixels=32 * 24).shape == (24, 32, 3)
    with pytest.raises(DecodeError, match='32x24 = 768 pixels is over the limit of 767'):
        decode(msg, max_pixels=32 * 24 - 1)


def test_a_progressive_jpeg_with_extra_segments_is_sized_from_its_sof():
    rgb = smooth_rgb(40, 56)
    ok, buf = cv2.imencode(
        '.jpg', rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 2]
    )
    assert ok
    assert compressed_size(buf.tobytes()) == ('jpeg', 56, 40)


def test_raw_frames_over_the_limit_are_refused_by_their_declared_size():
    # Declared 20000x20000 with a tiny buffer: refused for its size, not only for the data.
    msg = image_msg('rgb8', 20000, 20000, b'\0' * 12, step=60000)
    with pytest.raises(DecodeError, match='over the limit of 16777216'):
        decode(msg)
    small = image_msg('rgb8', 24, 32, bytes(24 * 32 * 3))
    with pytest.raises(DecodeError, match='32x24 = 768 pixels is over the limit of 100'):
        decode(small, max_pixels=100)
    huge_data = image_msg('mono8', 2, 2, bytes(100), step=2)
    with pytest.raises(DecodeError, match='100 data bytes are more than a frame within'):
        decode(huge_data, max_pixels=4)
    with pytest.raises(ConfigError, match='max_frame_pixels must be an integer >= 1, got 0'):
        decode(small, max_pixels=0)


def test_damaged_or_foreign_compressed_frames_are_refused_before_opencv_sees_them(capfd):
    png = compressed(smooth_rgb(), '.png', 'png').data
    jpg = compressed(smooth_rgb(), '.jpg', 'jpeg').data
    _, bmp = cv2.imencode('.bmp', smooth_rgb())  # a format OpenCV reads but we do not size
    cases = {
        'CRC mismatch': png[:40] + bytes([png[40] ^ 0xFF]) + png[41:],
        'runs past the end': png[: len(png) // 2],
        'without the end-of-image marker': jpg[: len(jpg) // 2],
        'compressed frames must be PNG or JPEG': bmp.tobytes(),
    }
    for reason, data in cases.items():
        with pytest.raises(DecodeError, match=reason):
            decode(SimpleNamespace(format='x', data=data))
    captured = capfd.readouterr()
    assert captured.err == '' and captured.out == ''  # no OpenCV/libpng lines


def test_opencv_logging_is_silent_after_import():
    assert cv2.utils.logging.getLogLevel() == cv2.utils.logging.LOG_LEVEL_SILENT


# --- fit_frame / normalize / preprocess ---------------------------------------------------


@pytest.mark.parametrize('shape', [(24, 32), (48, 64), (7, 5), (100, 3), (1, 1)])
@pytest.mark.parametrize('channels', [1, 3])
def test_fit_frame_accepts_any_size_and_gives_the_configured_shape(shape, channels):
    cfg = PreprocessConfig(height=12, width=16, channels=channels)
    out = fit_frame(random_rgb(*shape), cfg)
    assert out.shape == (12, 16, channels) and out.dtype == np.uint8


def test_fit_frame_grey_is_opencvs_grey_of_the_resized_frame():
    cfg = PreprocessConfig(height=12, width=16, channels=1)
    rgb = random_rgb(24, 32, seed=5)
    resized = cv2.resize(rgb, (16, 12), interpolation=cv2.INTER_AREA)
    expected = cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(fit_frame(rgb, cfg)[..., 0], expected)


def test_crop_right_half_of_red_left_blue_right_leaves_only_red():
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:, :16] = (255, 0, 0)
    rgb[:, 16:] = (0, 0, 255)
    cfg = PreprocessConfig(height=6, width=8, crop_right=0.5)
    out = fit_frame(rgb, cfg)
    assert (out == np.array([255, 0, 0], np.uint8)).all()
    uncropped = fit_frame(rgb, PreprocessConfig(height=6, width=8))
    assert (uncropped[:, :4] == (255, 0, 0)).all() and (uncropped[:, 4:] == (0, 0, 255)).all()


def test_crop_top_and_bottom_fractions_select_the_rows():
    rgb = np.zeros((20, 10, 3), np.uint8)
    rgb[:5] = 200  # the top quarter (sky) ...
    rgb[15:] = 100  # ... and the bottom quarter (bumper) are cut off
    rgb[5:15] = 50
    cfg = PreprocessConfig(height=5, width=5, crop_top=0.25, crop_bottom=0.25)
    assert (fit_frame(rgb, cfg) == 50).all()


def test_fit_frame_shrinks_with_inter_area_averaging():
    checker = np.zeros((12, 12, 3), np.uint8)
    checker[::2, ::2] = 255
    checker[1::2, 1::2] = 255
    cfg = PreprocessConfig(height=4, width=4)
    out = fit_frame(checker, cfg)
    np.testing.assert_array_equal(out, cv2.resize(checker, (4, 4), interpolation=cv2.INTER_AREA))
    # Each target pixel averages a 3x3 block holding four or five 255s (113 or 142);
    # nearest or bilinear sampling would hit single pixels (0 or 255).
    assert set(np.unique(out)) <= {113, 142}


def test_fit_frame_returns_a_new_array_even_without_resizing():
    rgb = random_rgb(12, 16)
    out = fit_frame(rgb, PreprocessConfig(height=12, width=16))
    np.testing.assert_array_equal(out, rgb)
    assert not np.shares_memory(out, rgb)


@pytest.mark.parametrize(
    'bad',
    [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)],
)
def test_fit_frame_rejects_what_is_not_an_rgb_frame(bad):
    with pytest.raises(DecodeError, match='expected'):
        fit_frame(bad, PreprocessConfig(height=2, width=2))


def test_unit_normalization_maps_to_zero_one():
    frame = np.array([[[0, 128, 255]]], np.uint8)
    out = normalize(frame, PreprocessConfig(height=1, width=1, normalization='unit'))
    assert out.dtype == np.float32 and out.shape == frame.shape
    np.testing.assert_allclose(out, [[[0.0, 128 / 255, 1.0]]], rtol=1e-6)
    many = normalize(
        random_rgb(24, 32), PreprocessConfig(height=24, width=32, normalization='unit')
    )
    assert many.min() >= 0.0 and many.max() <= 1.0


def test_standardize_gives_zero_mean_unit_std_per_frame_and_channel():
    rng = np.random.default_rng(1)
    frame = np.stack(
        [rng.integers(0, 50, (24, 32)), rng.integers(100, 256, (24, 32)), np.full((24, 32), 9)],
        axis=-1,
    ).astype(np.uint8)
    cfg = PreprocessConfig(height=24, width=32, normalization='standardize')
    out = normalize(frame, cfg)
    assert out.dtype == np.float32 and out.shape == frame.shape
    np.testing.assert_allclose(out.mean(axis=(0, 1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[..., :2].std(axis=(0, 1)), 1.0, atol=1e-4)
    assert (out[..., 2] == 0).all()  # constant channel: no division by zero, all zeros


def test_standardize_of_a_constant_frame_is_finite_zeros():
    cfg = PreprocessConfig(height=4, width=4, normalization='standardize')
    out = normalize(np.full((4, 4, 3), 77, np.uint8), cfg)
    assert np.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize('normalization', ['unit', 'standardize'])
def test_stacked_frames_normalize_like_one_by_one(normalization):
    cfg = PreprocessConfig(height=6, width=8, normalization=normalization)
    frames = np.random.default_rng(2).integers(0, 256, (2, 3, 6, 8, 3), dtype=np.uint8)
    stacked = normalize(frames, cfg)
    assert stacked.shape == frames.shape and stacked.dtype == np.float32
    for b in range(2):
        for t in range(3):
            np.testing.assert_allclose(stacked[b, t], normalize(frames[b, t], cfg), atol=1e-6)


def reference_normalize(frames: np.ndarray, normalization: str) -> np.ndarray:
    """The formula as first written (numpy reductions over H, W in float64), kept as the
    reference the fast ``normalize`` must reproduce."""
    if normalization == 'unit':
        return frames.astype(np.float32) / np.float32(255.0)
    axes = (-3, -2)
    centred = frames - frames.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = np.sqrt(np.mean(np.square(centred), axis=axes, keepdims=True))
    centred /= np.maximum(std, 1.0 / np.sqrt(frames.shape[-3] * frames.shape[-2]))
    return centred.astype(np.float32)


def _assert_float32_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    # float32 tolerance: a few ulps of each value (outputs reach ~H*W^0.5 on near-constant
    # frames, where the floor divides), and exact where the reference is exactly zero.
    np.testing.assert_allclose(got, want, rtol=4e-7, atol=1e-7)
    assert ((got == 0) == (want == 0)).all()


FRAME_KINDS = {
    'random': lambda rng, shape: rng.integers(0, 256, shape),
    'low contrast': lambda rng, shape: rng.integers(120, 123, shape),
    'constant (std 0)': lambda rng, shape: np.full(shape, 77),
    'one pixel off (std below the floor)': lambda rng, shape: _one_off(shape),
    'black and white': lambda rng, shape: rng.integers(0, 2, shape) * 255,
}


def _one_off(shape: tuple[int, ...]) -> np.ndarray:
    frame = np.full(shape, 200)
    frame[..., 0, 0, :] = 201
    return frame


@pytest.mark.parametrize('normalization', ['unit', 'standardize'])
@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('kind', sorted(FRAME_KINDS))
def test_fast_normalize_equals_the_reference_formula(normalization, channels, kind):
    cfg = PreprocessConfig(height=30, width=40, channels=channels, normalization=normalization)
    rng = np.random.default_rng(7)
    for shape in [(30, 40, channels), (2, 3, 30, 40, channels)]:
        frames = FRAME_KINDS[kind](rng, shape).astype(np.uint8)
        want = reference_normalize(frames, normalization)
        _assert_float32_close(normalize(frames, cfg), want)
        if kind.startswith('constant') and normalization == 'standardize':
            assert (normalize(frames, cfg) == 0).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frame=st.integers(1, 9).flatmap(
        lambda h: st.integers(1, 9).flatmap(
            lambda w: st.lists(st.integers(0, 255), min_size=h * w * 3, max_size=h * w * 3).map(
                lambda v: np.array(v, np.uint8).reshape(h, w, 3)
            )
        )
    ),
    normalization=st.sampled_from(['unit', 'standardize']),
)
def test_fast_normalize_equals_the_reference_formula_on_any_frame(frame, normalization):
    cfg = PreprocessConfig(
        height=frame.shape[0], width=frame.shape[1], normalization=normalization
    )
    _assert_float32_close(normalize(frame, cfg), reference_normalize(frame, normalization))


@pytest.mark.parametrize('normalization', ['unit', 'standardize'])
def test_normalize_writes_into_out_and_returns_it(normalization):
    cfg = PreprocessConfig(height=6, width=8, normalization=normalization)
    frames = np.random.default_rng(3).integers(0, 256, (2, 6, 8, 3), dtype=np.uint8)
    out = np.full(frames.shape, np.nan, np.float32)
    assert normalize(frames, cfg, out=out) is out  # the runtime's input tensor: no new array
    np.testing.assert_array_equal(out, normalize(frames, cfg))
    one = np.empty((6, 8, 3), np.float32)
    assert preprocess(random_rgb(12, 16), cfg, out=one) is one
    np.testing.assert_array_equal(one, preprocess(random_rgb(12, 16), cfg))
    for bad in (np.empty((6, 8, 3), np.float64), np.empty((2, 6, 8, 1), np.float32),
                np.empty((2, 8, 6, 3), np.float32).transpose(0, 2, 1, 3)):  # fmt: skip
        with pytest.raises(
            DecodeError, match=r"out must be .* float32 array of the frames' shape"
        ):
            normalize(frames, cfg, out=bad)


def test_normalize_takes_uint8_frames_only():
    with pytest.raises(DecodeError, match='expected uint8 frames, got float32'):
        normalize(np.zeros((4, 4, 3), np.float32), PreprocessConfig(height=4, width=4))


def test_normalize_rejects_frames_with_the_wrong_channel_count():
    with pytest.raises(DecodeError, match=r'\(\.\.\., H, W, 1\)'):
        normalize(np.zeros((4, 4, 3), np.uint8), PreprocessConfig(height=4, width=4, channels=1))


@pytest.mark.parametrize('normalization', ['unit', 'standardize'])
def test_preprocess_is_normalize_of_fit_frame(normalization):
    cfg = PreprocessConfig(height=12, width=16, crop_top=0.25, normalization=normalization)
    rgb = random_rgb(24, 32, seed=9)
    out = preprocess(rgb, cfg)
    assert out.shape == (12, 16, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, normalize(fit_frame(rgb, cfg), cfg))


# --- encode_image_fields ------------------------------------------------------------------


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_encoded_colour_fields_decode_back_exactly(encoding):
    rgb = random_rgb(5, 7, seed=4)
    fields = encode_image_fields(rgb, encoding)
    assert isinstance(fields['data'], bytes)
    assert fields['encoding'] == encoding and (fields['height'], fields['width']) == (5, 7)
    assert fields['step'] == 7 * (4 if 'a' in encoding[:4] else 3)
    np.testing.assert_array_equal(decode(SimpleNamespace(**fields)), rgb)


@pytest.mark.parametrize('encoding', ['mono8', 'mono16'])
def test_encoded_mono_fields_decode_to_opencv_grey(encoding):
    rgb = random_rgb(5, 7, seed=4)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    out = decode(SimpleNamespace(**encode_image_fields(rgb, encoding)))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_encode_rejects_unknown_encodings():
    with pytest.raises(ConfigError, match="'yuv422'"):
        encode_image_fields(random_rgb(), 'yuv422')


# --- real message classes ------------------------------------------------------------------


def test_rclpy_and_rosbags_image_messages_decode_alike():
    from rosbags.typesys import Stores, get_typestore
    from sensor_msgs.msg import Image

    rgb = random_rgb(6, 8, seed=11)
    data, step = padded(np.ascontiguousarray(rgb[..., ::-1]), 4)  # bgr8 with row padding

    ros_msg = Image(height=6, width=8, encoding='bgr8', is_bigendian=0, step=step)
    ros_msg.data = data
    assert isinstance(ros_msg.data, array.array)

    image_type = 'sensor_msgs/msg/Image'
    store = get_typestore(Stores.ROS2_KILTED)
    types = store.types
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=1, nanosec=2), frame_id='camera'
    )
    bag_msg = types[image_type](
        header=header,
        height=6,
        width=8,
        encoding='bgr8',
        is_bigendian=0,
        step=step,
        data=np.frombuffer(data, np.uint8),
    )
    # Through CDR, as a bag reader hands it over.
    bag_msg = store.deserialize_cdr(store.serialize_cdr(bag_msg, image_type), image_type)
    assert isinstance(bag_msg.data, np.ndarray)

    from_ros, from_bag = decode(ros_msg), decode(bag_msg)
    np.testing.assert_array_equal(from_ros, rgb)
    np.testing.assert_array_equal(from_bag, rgb)
