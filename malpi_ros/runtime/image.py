"""Image messages to RGB arrays, and RGB arrays to model input: one code path for train and robot.

``decode`` reads only the fields every ``sensor_msgs/Image`` has (``height, width, encoding,
step, is_bigendian, data``), so rclpy messages (``data`` is ``array('B')``), ``rosbags`` messages
(``data`` is a numpy array) and plain test objects all work; a ``sensor_msgs/CompressedImage``
(``format`` and ``data``, no ``encoding``) is decoded by its content (PNG or JPEG).

Decoding is bounded: a frame whose declared size is over ``max_pixels`` (a raw frame's
height x width, a compressed frame's header; ``runtime.frame_size``) is refused before any
pixel is decoded, in the node, in ``inspect`` and in training alike. OpenCV's own log lines are
switched off at import: every refusal is a ``DecodeError`` with the reason, which the callers
count and log (throttled) themselves.

Conversions match what ``cv_bridge`` gives for ``imgmsg_to_cv2(msg, 'rgb8')`` on a robot, so a
policy trained here sees the same pixels as one fed by cv_bridge there:

- ``mono16`` → 8 bit: cv_bridge scales by ``255 / 65535`` with rounding (``convertTo``), i.e.
  ``round(v / 257)``; not the high byte (``v >> 8``), which differs by one for about half the
  values (e.g. 255 → 1, not 0). We follow cv_bridge.
- ``yuv422`` is UYVY and ``yuv422_yuy2`` is YUY2/YUYV, converted with OpenCV's
  ``COLOR_YUV2RGB_UYVY`` / ``COLOR_YUV2RGB_YUY2`` (what cv_bridge calls). The newer names
  ``uyvy`` / ``yuyv`` are accepted as aliases.
- ``rgba8`` / ``bgra8`` drop the alpha channel (no blending), as ``COLOR_RGBA2RGB`` does.

``preprocess = normalize(fit_frame(rgb))``: training caches ``fit_frame``'s uint8 output and
applies ``normalize`` later, the robot applies both per frame; both call this module.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from malpi_ros.config import PreprocessConfig
from malpi_ros.errors import ConfigError, DecodeError
from malpi_ros.runtime.frame_size import (
    DEFAULT_MAX_FRAME_PIXELS,
    check_data_size,
    check_max_pixels,
    check_size,
    compressed_size,
)

# OpenCV prints a line per bad frame ("[ WARN:0@..] ... PNG input buffer is incomplete"), past
# the nodes' throttled logs; our DecodeError says the same once. (libpng/libjpeg messages on
# corrupt pixel data bypass this logger; frame_size refuses the common causes before them.)
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

# encoding -> (channels, bytes per channel) of the raw layout.
_LAYOUTS: dict[str, tuple[int, int]] = {
    'rgb8': (3, 1),
    'bgr8': (3, 1),
    'rgba8': (4, 1),
    'bgra8': (4, 1),
    'mono8': (1, 1),
    'mono16': (1, 2),
    'yuv422': (2, 1),
    'uyvy': (2, 1),
    'yuv422_yuy2': (2, 1),
    'yuyv': (2, 1),
}
ENCODINGS = tuple(_LAYOUTS)

_YUV_CODES = {
    'yuv422': cv2.COLOR_YUV2RGB_UYVY,
    'uyvy': cv2.COLOR_YUV2RGB_UYVY,
    'yuv422_yuy2': cv2.COLOR_YUV2RGB_YUY2,
    'yuyv': cv2.COLOR_YUV2RGB_YUY2,
}


def decode(msg: Any, max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from an Image or CompressedImage message.

    The result may be a read-only view of ``msg.data`` (rgb8 is not copied); copy it before
    writing to it. Every malformed message raises ``DecodeError`` naming encoding and sizes,
    and so does a frame over ``max_pixels`` (checked before decoding, see ``frame_size``).
    """
    check_max_pixels(max_pixels)
    if not hasattr(msg, 'encoding') and hasattr(msg, 'format'):
        return _decode_compressed(msg, max_pixels)
    try:
        encoding = msg.encoding
        height, width, step = msg.height, msg.width, msg.step
        is_bigendian = msg.is_bigendian
        data = msg.data
    except AttributeError as err:
        raise DecodeError(f'not an image message ({type(msg).__name__}): {err}') from err
    what = _describe(encoding, height, width, step, data)
    if not isinstance(encoding, str) or encoding not in _LAYOUTS:
        raise DecodeError(
            f'cannot decode {what}: unsupported encoding; supported: {", ".join(ENCODINGS)}'
        )
    for name, value in (('height', height), ('width', width), ('step', step)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise DecodeError(f'cannot decode {what}: {name} must be an integer >= 0')
    height, width, step = int(height), int(width), int(step)
    if height == 0 or width == 0:
        raise DecodeError(f'cannot decode {what}: the image is empty')
    check_size(what, width, height, _length(data), max_pixels)
    channels, depth = _LAYOUTS[encoding]
    row = width * channels * depth
    if step < row:
        raise DecodeError(
            f'cannot decode {what}: step is smaller than a row of {width} pixels '
            f'x {channels * depth} bytes = {row}'
        )
    if encoding in _YUV_CODES and width % 2:
        raise DecodeError(f'cannot decode {what}: 4:2:2 YUV needs an even width')
    buf = _byte_view(data, what)
    need = step * height
    if buf.size < need:
        raise DecodeError(
            f'cannot decode {what}: data is shorter than step*height = {step}*{height} = {need}'
        )
    try:
        # Rows of `step` bytes, padding cut off: still a view of the message's buffer.
        rows = buf[:need].reshape(height, step)[:, :row]
        return _to_rgb(rows, encoding, height, width, bool(is_bigendian))
    except (ValueError, TypeError, cv2.error) as err:  # the checks above should make it rare
        raise DecodeError(f'cannot decode {what}: {err}') from err


def _length(data: Any) -> int:
    try:
        return len(data)
    except TypeError:
        return 0  # not a buffer: _byte_view says so


def _describe(encoding: Any, height: Any, width: Any, step: Any, data: Any) -> str:
    try:
        size = f'{len(data)} data bytes'
    except TypeError:
        size = f'data of type {type(data).__name__}'
    return f'{encoding!r} image {width}x{height} (width x height), step {step}, {size}'


def _byte_view(data: Any, what: str) -> np.ndarray:
    """``data`` as a flat uint8 array, without a copy for buffers and contiguous arrays."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise DecodeError(
                f'cannot decode {what}: data array has dtype {data.dtype}, not uint8'
            )
        return data.reshape(-1)
    if isinstance(data, str):
        raise DecodeError(f'cannot decode {what}: data is a str, not bytes')
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as err:
        raise DecodeError(
            f'cannot decode {what}: data of type {type(data).__name__} is not a byte buffer'
        ) from err


def _to_rgb(rows: np.ndarray, encoding: str, height: int, width: int, big: bool) -> np.ndarray:
    if encoding == 'rgb8':
        return rows.reshape(height, width, 3)
    if encoding in ('bgr8', 'rgba8', 'bgra8'):
        pixels = rows.reshape(height, width, len(encoding) - 1)
        rgb = pixels[..., 2::-1] if encoding.startswith('bgr') else pixels[..., :3]
        return np.ascontiguousarray(rgb)
    if encoding == 'mono8':
        return np.repeat(rows.reshape(height, width, 1), 3, axis=2)
    if encoding == 'mono16':
        values = rows.view('>u2' if big else '<u2').astype(np.uint32)
        # cv_bridge: convertTo(CV_8U, 255/65535), rounding to nearest == (v + 128) // 257.
        grey = ((values + 128) // 257).astype(np.uint8)
        return np.repeat(grey.reshape(height, width, 1), 3, axis=2)
    pairs = np.ascontiguousarray(rows.reshape(height, width, 2))
    return cv2.cvtColor(pairs, _YUV_CODES[encoding])


def _decode_compressed(msg: Any, max_pixels: int) -> np.ndarray:
    fmt = getattr(msg, 'format', None)
    data = getattr(msg, 'data', None)
    try:
        what = f'compressed image (format {fmt!r}, {len(data)} bytes)'  # type: ignore[arg-type]
    except TypeError:
        what = f'compressed image (format {fmt!r}, data of type {type(data).__name__})'
    buf = _byte_view(data, what)
    if buf.size == 0:
        raise DecodeError(f'cannot decode {what}: no data')
    check_data_size(what, buf.size, max_pixels)
    try:
        # By content, not by `format`: publishers write "jpeg", "png", "rgb8; jpeg compressed
        # bgr8", ... and the bytes say what they are.
        kind, width, height = compressed_size(buf.data)
    except DecodeError as err:
        raise DecodeError(f'cannot decode {what}: {err}') from err
    check_size(f'{what}, a {kind} of', width, height, buf.size, max_pixels)
    try:
        # IMREAD_COLOR gives 3-channel BGR always.
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise DecodeError(f'cannot decode {what}: {err}') from err
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.size == 0:
        raise DecodeError(f'cannot decode {what}: not an image OpenCV can read')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check_frame(rgb: Any) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        kind = getattr(rgb, 'dtype', type(rgb).__name__)
        raise DecodeError(f'expected an RGB uint8 array, got {kind}')
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DecodeError(f'expected an RGB frame of shape (H, W, 3), got {rgb.shape}')
    return rgb


def crop_box(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of the crop; always at least one pixel."""
    top, bottom = _bounds(height, cfg.crop_top, cfg.crop_bottom)
    left, right = _bounds(width, cfg.crop_left, cfg.crop_right)
    return top, bottom, left, right


def _bounds(size: int, low: float, high: float) -> tuple[int, int]:
    start = min(round(size * low), size - 1)
    stop = max(size - round(size * high), start + 1)
    return start, stop


def fit_frame(rgb: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Crop, resize (INTER_AREA) and maybe grey a frame: uint8 (cfg.height, cfg.width, C).

    INTER_AREA averages the source pixels under each target pixel, so shrinking a camera frame
    does not alias (fine texture does not turn into noise that depends on the resolution).
    The result is a new array that never shares memory with the message.
    """
    frame = _check_frame(rgb)
    top, bottom, left, right = crop_box(frame.shape[0], frame.shape[1], cfg)
    frame = frame[top:bottom, left:right]
    if frame.shape[:2] == (cfg.height, cfg.width):
        frame = frame.copy()
    else:
        frame = cv2.resize(
            np.ascontiguousarray(frame), (cfg.width, cfg.height), interpolation=cv2.INTER_AREA
        )
    if cfg.channels == 1:
        # Grey after the resize: fewer pixels to convert, and the same for train and robot.
        return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)[..., np.newaxis]
    return frame


def normalize(
    frames_uint8: np.ndarray, cfg: PreprocessConfig, out: np.ndarray | None = None
) -> np.ndarray:
    """float32 model input of the same shape, for one frame (h, w, c) or stacked (..., h, w, c).

    'unit' maps to [0, 1]. 'standardize' (MaLPi's choice) makes each frame's channels zero-mean
    and unit-variance over H, W, so the policy does not depend on exposure; the divisor is
    ``max(std, 1/sqrt(H*W))`` so a constant frame gives zeros, not a division by zero.
    ``out``: a C-contiguous float32 array of the frames' shape to write into and return (e.g.
    the runtime's input tensor), so the robot allocates nothing per frame.
    """
    frames = np.asarray(frames_uint8)
    if frames.ndim < 3 or frames.shape[-1] != cfg.channels:
        raise DecodeError(
            f'expected frames of shape (..., H, W, {cfg.channels}), got {frames.shape}'
        )
    if frames.dtype != np.uint8:
        raise DecodeError(f'expected uint8 frames, got {frames.dtype}')
    out = _float_output(frames.shape, out)
    if cfg.normalization == 'unit':
        return np.divide(frames, np.float32(255.0), out=out, dtype=np.float32)
    # One frame at a time: a frame's result cannot depend on how many frames are stacked.
    height, width, channels = frames.shape[-3:]
    floor = 1.0 / math.sqrt(height * width)
    for frame, dst in zip(
        frames.reshape(-1, height, width, channels),
        out.reshape(-1, height, width, channels),
        strict=True,
    ):
        _standardize(frame, dst, floor)
    return out


# Every uint8 level, one per row: 'standardize' evaluates its formula on these, not on pixels.
_LEVELS = np.arange(256, dtype=np.float64)[:, np.newaxis]


def _standardize(frame: np.ndarray, dst: np.ndarray, floor: float) -> None:
    """``(frame - mean) / max(std, floor)`` per channel, written into ``dst``.

    A uint8 channel has only 256 values: the formula is evaluated in float64 once per value
    (a 256 x C table, rounded once to float32) and looked up per pixel with ``cv2.LUT``. The
    same numbers as evaluating it per pixel in float64 (seen: bit for bit), ~10x faster than
    numpy reductions over axes (0, 1), which walk the frame with a stride of C.
    """
    pixels = frame.shape[0] * frame.shape[1]
    mean, std = cv2.meanStdDev(frame)  # float64; OpenCV sums uint8 exactly
    # OpenCV returns the exact sum times 1/n, one rounding off sum / n: recover the sum, so a
    # constant frame centres to exact zeros.
    mean = np.rint(mean[:, 0] * pixels) / pixels
    table = ((_LEVELS - mean) / np.maximum(std[:, 0], floor)).astype(np.float32)
    written = cv2.LUT(frame, table.reshape(256, 1, -1), dst=dst)
    if written is not dst:  # OpenCV allocates instead when dst does not fit: never silently
        np.copyto(dst, written.reshape(dst.shape))


def _float_output(shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    fits = (
        isinstance(out, np.ndarray)
        and out.dtype == np.float32
        and out.shape == shape
        and out.flags.c_contiguous
        and out.flags.writeable
    )
    if not fits:
        got = f'{out.dtype}{list(out.shape)}' if isinstance(out, np.ndarray) else type(out)
        raise DecodeError(
            f"out must be a writable C-contiguous float32 array of the frames' shape "
            f'{list(shape)}, got {got}'
        )
    return out


def preprocess(
    rgb: np.ndarray, cfg: PreprocessConfig, out: np.ndarray | None = None
) -> np.ndarray:
    """THE preprocessing of training and robot: float32 (cfg.height, cfg.width, cfg.channels).

    ``out``: where to write it (see ``normalize``).
    """
    return normalize(fit_frame(rgb, cfg), cfg, out)


_ENCODERS = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16')


def encode_image_fields(rgb: np.ndarray, encoding: str = 'rgb8') -> dict[str, Any]:
    """The fields of a ``sensor_msgs/Image`` holding ``rgb``: for tests, simulator, bag writers.

    ``data`` is ``bytes`` (assigning bytes to an rclpy message is fast; a numpy array is not).
    mono8/mono16 hold OpenCV's RGB→grey (mono16 scaled by 257, little-endian).
    """
    frame = _check_frame(rgb)
    if encoding not in _ENCODERS:
        raise ConfigError(f'cannot encode as {encoding!r}; supported: {", ".join(_ENCODERS)}')
    height, width = frame.shape[:2]
    big = False
    if encoding == 'rgb8':
        pixels = frame
    elif encoding == 'bgr8':
        pixels = frame[..., ::-1]
    elif encoding in ('rgba8', 'bgra8'):
        colour = frame if encoding == 'rgba8' else frame[..., ::-1]
        pixels = np.concatenate([colour, np.full((height, width, 1), 255, np.uint8)], axis=2)
    else:
        grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        pixels = grey if encoding == 'mono8' else (grey.astype('<u2') * 257)
    data = np.ascontiguousarray(pixels).tobytes()
    return {
        'height': height,
        'width': width,
        'encoding': encoding,
        'step': len(data) // height,
        'is_bigendian': big,
        'data': data,
    }
