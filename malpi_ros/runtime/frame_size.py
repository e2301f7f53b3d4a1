"""How big a frame is before it is decoded: the ``max_frame_pixels`` limit and header reading.

A compressed frame's size is not its byte count: a 380 KiB PNG of zeros decodes to 20000x20000
pixels (seen: 10-15 s and 2.4 GB in ``policy_node``, the same in ``inspect``). So the limit is
checked on what a frame *declares* - a raw Image's ``height x width``, a PNG's IHDR, a JPEG's
SOFn marker - before any decoder runs. The parsers here read headers and chunk/marker framing
only (no pixel data; pure Python, no OpenCV), and they also refuse what OpenCV would only
complain about on stderr: a PNG chunk with a wrong CRC or cut short, a JPEG without its end
marker (libjpeg fills the missing part with grey and prints a line). Only PNG and JPEG are
accepted as compressed frames: what ROS's ``compressed_image_transport`` publishes, and the two
formats whose headers are read here - any other format OpenCV can open could be a bomb this
module cannot size.

The default limit, 4096 x 4096 = 16.8 Mpx: every Raspberry Pi camera's full frame fits (HQ
4056x3040, v3 4608x2592 = 11.9 Mpx), and one frame at the limit decodes to 50 MB of RGB (about
twice that at the decoder's peak), which a 1 GB Pi survives. The model sees 120x160.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from malpi_ros.checks import int_at_least
from malpi_ros.errors import ConfigError, DecodeError

DEFAULT_MAX_FRAME_PIXELS = 4096 * 4096
MAX_FRAME_PIXELS_CAP = 1 << 30  # OpenCV's own imdecode cap (OPENCV_IO_MAX_IMAGE_PIXELS)
# Bytes a frame's data may hold per allowed pixel: the widest raw pixel (rgba8) is 4 bytes;
# twice that leaves room for row padding. Bigger data cannot be a frame within the limit.
DATA_BYTES_PER_PIXEL = 8

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
JPEG_SOI = b'\xff\xd8'
JPEG_EOI = b'\xff\xd9'
# Start-of-frame markers: baseline, extended, progressive, lossless (Huffman and arithmetic).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
# Markers without a length field: TEM, RST0-7 (SOI/EOI handled apart).
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])


def check_max_pixels(value: Any) -> int:
    """``value`` as a limit, or ConfigError saying what was given."""
    int_at_least('max_frame_pixels', value, 1)
    if value > MAX_FRAME_PIXELS_CAP:
        raise ConfigError(
            f'max_frame_pixels must be <= {MAX_FRAME_PIXELS_CAP} (OpenCV refuses more), '
            f'got {value}'
        )
    return value


def check_size(what: str, width: int, height: int, data_bytes: int, max_pixels: int) -> None:
    """DecodeError when the declared frame or its data is over ``max_pixels``."""
    pixels = width * height
    if pixels > max_pixels:
        raise DecodeError(
            f'cannot decode {what}: {width}x{height} = {pixels} pixels is over the limit of '
            f'{max_pixels} (max_frame_pixels); not decoded'
        )
    check_data_size(what, data_bytes, max_pixels)


def check_data_size(what: str, data_bytes: int, max_pixels: int) -> None:
    if data_bytes > max_pixels * DATA_BYTES_PER_PIXEL:
        raise DecodeError(
            f'cannot decode {what}: {data_bytes} data bytes are more than a frame within '
            f'max_frame_pixels ({max_pixels}) can hold; not decoded'
        )


def compressed_size(data: bytes | memoryview) -> tuple[str, int, int]:
    """(format, width, height) of a PNG or JPEG from its header; DecodeError when malformed."""
    head = bytes(data[:8])
    if head == PNG_SIGNATURE:
        return ('png', *_png_size(data))
    if head[:2] == JPEG_SOI:
        return ('jpeg', *_jpeg_size(data))
    raise DecodeError(
        f'not a PNG or JPEG (starts with {head[:4].hex(" ")}); compressed frames must be '
        'PNG or JPEG'
    )


def _png_size(data: bytes | memoryview) -> tuple[int, int]:
    """Width and height from IHDR, after walking every chunk's length and CRC up to IEND."""
    pos, size = len(PNG_SIGNATURE), len(data)
    width = height = None
    while True:
        if pos + 12 > size:
            raise DecodeError(f'PNG cut short at byte {pos} of {size} (no IEND chunk)')
        length, kind = struct.unpack('>I4s', data[pos : pos + 8])
        end = pos + 12 + length
        if end > size:
            name = kind.decode('latin-1')
            raise DecodeError(f'PNG chunk {name!r} of {length} bytes runs past the end ({size})')
        crc = struct.unpack('>I', data[end - 4 : end])[0]
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise DecodeError(f'PNG chunk {kind.decode("latin-1")!r} at byte {pos}: CRC mismatch')
        if width is None:
            if kind != b'IHDR' or length != 13:
                raise DecodeError('PNG does not start with an IHDR chunk')
            width, height = struct.unpack('>II', data[pos + 8 : pos + 16])
            if width == 0 or height == 0:
                raise DecodeError(f'PNG declares an empty image ({width}x{height})')
        if kind == b'IEND':
            return width, height  # type: ignore[return-value]  # IHDR came first
        pos = end


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int]:
    """Width and height from the first SOFn marker, walking the marker segments before it."""
    size = len(data)
    if bytes(data[-2:]) != JPEG_EOI and bytes(data).rstrip(b'\0')[-2:] != JPEG_EOI:
        raise DecodeError(f'JPEG cut short: {size} bytes without the end-of-image marker')
    pos = 2
    while True:
        while pos < size and data[pos] == 0xFF and pos + 1 < size and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 4 > size or data[pos] != 0xFF:
            raise DecodeError(f'JPEG has no frame header (SOFn) before byte {pos} of {size}')
        marker = data[pos + 1]
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: the image data began without a frame header
            raise DecodeError('JPEG has no frame header (SOFn) before its scan')
        length = struct.unpack('>H', data[pos + 2 : pos + 4])[0]
        if length < 2 or pos + 2 + length > size:
            raise DecodeError(f'JPEG marker 0x{marker:02X} at byte {pos} runs past the end')
        if marker in _JPEG_SOF:
            if length < 8:
                raise DecodeError(f'JPEG frame header at byte {pos} is too short')
            height, width = struct.unpack('>HH', data[pos + 5 : pos + 9])
            if width == 0 or height == 0:
                # height 0 means "given later by a DNL marker": the size is not known up front.
                raise DecodeError(f'JPEG declares a {width}x{height} frame (DNL not supported)')
            return width, height
        pos += 2 + length
