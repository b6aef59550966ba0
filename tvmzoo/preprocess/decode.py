"""Decoding: an image file -> BGR uint8, refusing what is not an image, truncated, or too large
before it is decoded."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from ..errors import ImageError
from ..limits import IMAGE_BYTES_PER_PIXEL, IMAGE_EXTRA_BYTES, IMAGE_HEADER_BYTES, special_file

# Images above this many pixels are refused before decoding (a 100 MP photo already needs
# 300 MB as BGR; ImageNet photos are ~0.2 MP).
MAX_PIXELS = 100_000_000


def _header_size(buf: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG / JPEG / BMP / WebP header without decoding, or None."""
    if buf[:8] == b"\x89PNG\r\n\x1a\n" and len(buf) >= 24:
        return int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
    if buf[:2] == b"BM" and len(buf) >= 26:
        return abs(int.from_bytes(buf[18:22], "little", signed=True)), \
            abs(int.from_bytes(buf[22:26], "little", signed=True))
    if buf[:4] == b"RIFF" and buf[8:12] == b"WEBP" and len(buf) >= 30:
        chunk = buf[12:16]
        if chunk == b"VP8X":
            return int.from_bytes(buf[24:27], "little") + 1, int.from_bytes(buf[27:30], "little") + 1
        if chunk == b"VP8 ":
            return int.from_bytes(buf[26:28], "little") & 0x3FFF, int.from_bytes(buf[28:30], "little") & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(buf[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        return None
    if buf[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(buf):
            if buf[i] != 0xFF:
                return None
            marker = buf[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                return int.from_bytes(buf[i + 7:i + 9], "big"), int.from_bytes(buf[i + 5:i + 7], "big")
            i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    return None


_FORMATS = {b"\xff\xd8": "JPEG", b"\x89PNG": "PNG", b"BM": "BMP", b"RIFF": "WebP"}


def _format_of(buf: bytes) -> str:
    for magic, name in _FORMATS.items():
        if buf.startswith(magic):
            return f"a {name} header without a readable image size"
    return f"content starts with {buf[:8]!r}"


def _jpeg_is_complete(buf: bytes) -> bool:
    # An end-of-image marker must follow the last start-of-scan (0xFFDA cannot occur inside
    # entropy-coded data); older OpenCV decodes a truncated JPEG into a grey-padded image.
    sos = buf.rfind(b"\xff\xda")
    return sos >= 0 and buf.find(b"\xff\xd9", sos) >= 0


def _checked_size(head: bytes | bytearray, path: str | Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header, refused when unknown or above `max_pixels`."""
    size = _header_size(head)
    if size is None:  # never hand OpenCV a file whose size is unknown: it would allocate first, then refuse
        raise ImageError(f"cannot decode {path}: not a supported image or corrupt/truncated data "
                         f"({_format_of(head)}; tvmzoo reads {', '.join(_FORMATS.values())}).")
    if size[0] * size[1] > max_pixels:
        raise ImageError(f"cannot decode {path}: {size[0]}x{size[1]} pixels is above the limit of "
                         f"{max_pixels} pixels; downscale the image first.")
    return size


def _read_bounded(path: Path, max_pixels: int) -> bytearray:
    """The file's bytes, read whole only once its header gives a size within `max_pixels` and the file
    is no larger than that many pixels can take (IMAGE_BYTES_PER_PIXEL, + IMAGE_EXTRA_BYTES of metadata)."""
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        if total == 0:
            raise ImageError(f"cannot decode {path}: the file is empty (0 bytes); re-copy or remove it.")
        head = f.read(min(total, 64 << 10))
        size = _header_size(head)
        while size is None and head[:2] == b"\xff\xd8" and len(head) < min(total, IMAGE_HEADER_BYTES):
            head += f.read(min(len(head), IMAGE_HEADER_BYTES - len(head)))  # EXIF / ICC segments first
            size = _header_size(head)
        size = _checked_size(head, path, max_pixels)
        most = size[0] * size[1] * IMAGE_BYTES_PER_PIXEL + IMAGE_EXTRA_BYTES
        if total > most:
            raise ImageError(f"cannot decode {path}: the file holds {total} bytes, more than a {size[0]}x{size[1]} "
                             f"image can take ({most}); it is corrupt or holds something else.")
        raw = bytearray(total)
        raw[:len(head)] = head
        got = len(head) + f.readinto(memoryview(raw)[len(head):])
    return raw[:got] if got < total else raw  # a file that shrank while read: decoding says what is missing


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 BGR, as cv2.imread(path, IMREAD_COLOR) does: EXIF
    orientation applied, grayscale expanded to 3 channels, alpha dropped, 16-bit scaled to 8-bit.
    Works with non-ASCII paths. Reads JPEG, PNG, BMP and WebP content (whatever the file is named):
    the size comes from the header, and images above `max_pixels` are refused before decoding, so
    memory stays bounded. Raises ImageError("cannot decode <path>: <reason>")."""
    path = Path(path)
    if special_file(path):   # opening a pipe nobody writes to would wait forever
        raise ImageError(f"cannot decode {path}: it is {special_file(path)}, not a regular file.")
    try:
        raw = _read_bounded(path, max_pixels)
    except FileNotFoundError:
        raise ImageError(f"cannot decode {path}: the file does not exist.") from None
    except OSError as err:
        raise ImageError(f"cannot decode {path}: cannot read it ({err.strerror or err}).") from None
    return decode_image(raw, str(path), max_pixels)


def decode_image(buf: np.ndarray | bytes | bytearray, path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`read_image` on encoded bytes already in memory (uint8 array, bytes or bytearray: the last two
    are decoded in place, without a copy); `path` names them in errors."""
    raw = buf if isinstance(buf, (bytes, bytearray)) else buf.tobytes()
    buf = np.frombuffer(raw, np.uint8)
    if buf.size == 0:
        raise ImageError(f"cannot decode {path}: the file is empty (0 bytes); re-copy or remove it.")
    _checked_size(raw, path, max_pixels)
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise ImageError(f"cannot decode {path}: OpenCV refused it ({str(err).strip().splitlines()[-1]}).") from None
    if image is None:
        raise ImageError(f"cannot decode {path}: not a supported image or corrupt/truncated data.")
    if raw[:2] == b"\xff\xd8" and not _jpeg_is_complete(raw):
        raise ImageError(f"cannot decode {path}: truncated JPEG (no end-of-image marker); re-copy the file.")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageError(f"cannot decode {path}: {image.shape[1]}x{image.shape[0]} pixels is above the "
                         f"limit of {max_pixels} pixels; downscale the image first.")
    return image
