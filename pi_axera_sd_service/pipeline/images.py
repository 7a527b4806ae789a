"""Image handling: decode and resize init images, latent tensor <-> PIL, encode with infotext.

Post-processing matches diffusers `VaeImageProcessor`; resize modes match A1111 `resize_image`;
infotext is stored where A1111 puts it (PNG `parameters` text chunk, EXIF UserComment otherwise).
"""

from __future__ import annotations

import binascii
import contextlib
import io
import math
import re
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

try:  # ISA-L's deflate: ≈5x faster than zlib at level 1, and a smaller file (bench_host.py)
    from isal import isal_zlib
except ImportError:  # optional: zlib gives the same pixels
    isal_zlib = None
try:  # SIMD base64, ≈50x faster than binascii both ways (0.78 MB of base64: 1.6 ms -> 0.03 ms)
    import pybase64
except ImportError:  # optional: binascii gives the same bytes
    pybase64 = None

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
EXIF_IFD_POINTER = 0x8769
EXIF_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_BACKGROUND = (255, 255, 255)
JPEG_MAX_EXIF = 65533  # bytes in one APP1 segment (PIL refuses more)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_FILTER_UP = 2


class ImageDecodeError(ValueError):
    """An init image that cannot or must not be decoded."""


class PixelBudget:
    """Decoded init-image pixels one request may still use (setting max_request_pixels)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def charge(self, width: int, height: int) -> None:
        """Count one decoded image; ImageDecodeError when the request's total would pass the limit."""
        if self.used + width * height > self.limit:
            raise ImageDecodeError(
                f"decoding this {width}x{height} image would bring the request to "
                f"{self.used + width * height} pixels; the limit is {self.limit} per request "
                "(setting max_request_pixels)"
            )
        self.used += width * height


def images_used(sent: int, batch_size: int) -> int:
    """How many of `sent` init images a batch reads (image i uses init image i % batch % sent):
    decode only these, so extra images cost no memory."""
    return min(sent, max(batch_size, 1))


def decode_image_b64(data: str, max_pixels: int, target_size: tuple[int, int] | None = None,
                     budget: PixelBudget | None = None) -> Image.Image:
    """Base64 (raw or `data:image/...;base64,` URI) PNG/JPEG/WEBP -> RGB image, EXIF orientation applied.

    The pixel count is checked from the header before the pixels are decoded. With `target_size`
    a JPEG is decoded at the smallest DCT scale (1/2 .. 1/8) still covering the target in both
    directions, whatever its orientation; `budget` caps the decoded pixels of the whole request.
    """
    return decode_image_bytes(_base64_payload(data), max_pixels, target_size, budget)


def _base64_payload(data: str) -> bytes:
    """The bytes of raw or data-URI base64; whitespace (wrapped lines) is allowed and ignored.

    The common case, one clean line, is decoded without looking for whitespace first."""
    text = _DATA_URI.sub("", data, count=1) if data[:5].lower() == "data:" else data
    if text:
        with contextlib.suppress(binascii.Error, ValueError):
            return _strict_b64decode(_padded(text))
    text = _DATA_URI.sub("", "".join(data.split()))
    if not text:
        raise ImageDecodeError("empty image data")
    try:
        return _strict_b64decode(_padded(text))
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError(f"invalid base64 image data: {exc}") from exc


def _padded(text: str) -> str:
    return text + "=" * (-len(text) % 4)


def _strict_b64decode(text: str) -> bytes:
    """Base64 text (alphabet and padding only) -> bytes; binascii's error (its wording) when it is
    not. binascii reads an ASCII str in place (base64.b64decode copies it to bytes first)."""
    if pybase64 is not None:
        with contextlib.suppress(binascii.Error, ValueError):
            return pybase64.b64decode(text, validate=True)
    return binascii.a2b_base64(text, strict_mode=True)


def b64encode_text(data: bytes) -> str:
    """Standard base64 of `data` as text, without line breaks (what the APIs send images as)."""
    encoded = pybase64.b64encode(data) if pybase64 is not None else binascii.b2a_base64(data, newline=False)
    return encoded.decode("ascii")


def decode_image_bytes(raw: bytes, max_pixels: int, target_size: tuple[int, int] | None = None,
                       budget: PixelBudget | None = None) -> Image.Image:
    """PNG/JPEG/WEBP bytes -> RGB image (see `decode_image_b64`)."""
    accepted = ", ".join(ACCEPTED_FORMATS)
    try:
        img = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, far above ours
        raise ImageDecodeError(
            f"image is larger than the limit of {max_pixels} pixels (setting max_init_image_pixels)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"cannot decode image: not a {accepted} image") from exc
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: PIL raises many kinds of errors
        raise ImageDecodeError(f"cannot decode image (accepted: {accepted}): {exc}") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels "
            "(setting max_init_image_pixels)"
        )
    if target_size is not None and img.format == "JPEG":
        side = max(target_size)
        with contextlib.suppress(Exception):  # draft is an optimisation; a full decode still works
            img.draft("RGB", (side, side))
    if budget is not None:
        budget.charge(*img.size)
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - truncated data, broken chunks
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    with contextlib.suppress(Exception):  # unreadable EXIF: the pixels are fine, keep them as stored
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to turn
    try:
        return _flatten_to_rgb(img)
    except Exception as exc:  # noqa: BLE001 - a mode PIL cannot convert
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc


_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _flatten_to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; transparent areas become white (A1111's default img2img background).

    16-bit grayscale (PNG `I;16`) is scaled to 8 bits: PIL's own convert clips it to white.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.float32)
        img = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return _rgb(img)


def _rgb(img: Image.Image) -> Image.Image:
    """`img` itself when it is RGB already (PIL's convert would copy it), else its RGB conversion."""
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_image(img: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111 `resize_image`: 0 stretch, 1 crop and resize (cover + centre crop), 2 resize and fill.

    Other modes are treated as 0. Modes 1 and 2 give A1111's pixels (within one level) on any size.
    """
    img = _rgb(img)
    if mode not in (1, 2) or img.size == (width, height):
        return img.resize((width, height), Image.Resampling.LANCZOS)
    target_wider = width / height > img.width / img.height
    if mode == 1:  # cover the target, keep its centre
        cover_w = width if target_wider else img.width * height // img.height
        cover_h = img.height * width // img.width if target_wider else height
        return _resize_centre_crop(img, cover_w, cover_h, width, height)
    target_taller = width / height < img.width / img.height
    fit_w = max(1, img.width * height // img.height if target_wider else width)
    fit_h = max(1, height if not target_taller else img.height * width // img.width)
    return _fill_around(img.resize((fit_w, fit_h), Image.Resampling.LANCZOS), width, height)


_LANCZOS_SUPPORT = 3.0  # Pillow's Lanczos kernel reaches 3 source pixels per unit of scale


def _resize_centre_crop(img: Image.Image, cover_w: int, cover_h: int, width: int, height: int) -> Image.Image:
    """The centre `width` x `height` of `img` resized to `cover_w` x `cover_h`, as A1111 gets it
    (full resize, then crop) without its full-size intermediate (512x1024000 for a 1x2000 image).

    Pillow resizes columns first, then rows, rounding to 8 bits in between. The column pass runs
    at full cover width (bit-identical to A1111) over only the source rows that the kept rows
    read; the row pass resizes just the kept rows (a box; within one level). A column pass wider
    than `_intermediate_budget` (panoramas far wider than the target) resizes the kept columns
    alone, which can differ from A1111 by 2 levels.
    """
    left, top = cover_w // 2 - width // 2, cover_h // 2 - height // 2
    scale_y = img.height / cover_h
    reach = _LANCZOS_SUPPORT * max(scale_y, 1.0) + 1
    first_row = max(0, math.floor(top * scale_y - reach))
    last_row = min(img.height, math.ceil((top + height) * scale_y + reach))
    rows = img.crop((0, first_row, img.width, last_row))
    lanczos = Image.Resampling.LANCZOS
    if cover_w * rows.height <= _intermediate_budget(img, width, height):
        columns_done = rows.resize((cover_w, rows.height), lanczos).crop((left, 0, left + width, rows.height))
    else:
        scale_x = img.width / cover_w
        columns_done = rows.resize((width, rows.height), lanczos,
                                   box=(left * scale_x, 0, (left + width) * scale_x, rows.height))
    kept_rows = (0, top * scale_y - first_row, width, (top + height) * scale_y - first_row)
    return columns_done.resize((width, height), lanczos, box=kept_rows)


def _intermediate_budget(img: Image.Image, width: int, height: int) -> int:
    """Most pixels an intermediate image of a resize may hold: the source's, or 4 targets'."""
    return max(img.width * img.height, 4 * width * height)


def _fill_around(fitted: Image.Image, width: int, height: int) -> Image.Image:
    """`fitted` centred on a `width` x `height` canvas, the gaps filled as A1111 fills them.

    A1111 resizes a zero-height (or zero-width) box on the fitted image's edge with Pillow's
    default bicubic filter: each filled row is 1.125 x the edge row - 0.125 x the row inside it.
    The far gap gets as many rows as the near one; the canvas clips the surplus.
    """
    w, h = fitted.size
    canvas = Image.new("RGB", (width, height))
    canvas.paste(fitted, (width // 2 - w // 2, height // 2 - h // 2))
    bicubic = Image.Resampling.BICUBIC
    if h < height and w == width and (gap := height // 2 - h // 2) > 0:
        canvas.paste(fitted.resize((w, gap), bicubic, box=(0, 0, w, 0)), (0, 0))
        canvas.paste(fitted.resize((w, gap), bicubic, box=(0, h, w, h)), (0, gap + h))
    elif w < width and h == height and (gap := width // 2 - w // 2) > 0:
        canvas.paste(fitted.resize((gap, h), bicubic, box=(0, 0, 0, h)), (0, 0))
        canvas.paste(fitted.resize((gap, h), bicubic, box=(w, 0, w, h)), (gap + w, 0))
    return canvas


def image_to_nchw(img: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
    """RGB image -> float32 [1, 3, H, W] in [-1, 1], written into `out` when given (its shape)."""
    hwc = np.asarray(_rgb(img))
    if out is None:
        out = np.empty((1, 3, *hwc.shape[:2]), dtype=np.float32)
    for channel in range(3):  # plane by plane: no transposed copy of the image
        np.divide(hwc[:, :, channel], np.float32(127.5), out=out[0, channel], dtype=np.float32)
    out -= np.float32(1.0)
    return out


def nchw_to_image(x: np.ndarray, overwrite: bool = False) -> Image.Image:
    """VAE output [1, C, H, W] (≈[-1, 1]) -> RGB image, as diffusers `VaeImageProcessor`:
    round(clip(x / 2 + 0.5, 0, 1) * 255), each step in float32 on one buffer (`x` itself when
    `overwrite` and it is float32)."""
    chw = np.asarray(x, dtype=np.float32)[0, :3]
    values = np.divide(chw, np.float32(2), out=chw if overwrite and chw.flags.writeable else None)
    values += np.float32(0.5)
    np.clip(values, np.float32(0.0), np.float32(1.0), out=values)
    values *= np.float32(255)
    np.round(values, out=values)
    pixels = np.empty((*values.shape[1:], 3), dtype=np.uint8)
    for channel in range(3):  # plane by plane: 5x faster than one strided cast of the transpose
        pixels[:, :, channel] = values[channel]
    return Image.fromarray(pixels, mode="RGB")


def encode_image(
    img: Image.Image,
    fmt: str = "png",
    infotext: str | None = None,
    jpeg_quality: int = 80,
    png_compress_level: int = 1,
) -> bytes:
    """Encode as png/jpeg/webp; the infotext goes into PNG `parameters` or EXIF UserComment."""
    fmt = fmt.lower()
    buf = io.BytesIO()
    if fmt == "png" and img.mode == "RGB":
        return encode_png_rgb(img, infotext, png_compress_level)
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if infotext:
            info.add_text("parameters", infotext)
        img.save(buf, format="PNG", pnginfo=info, compress_level=png_compress_level)
    elif fmt in ("jpeg", "jpg", "webp"):
        kwargs: dict = {"quality": jpeg_quality}
        if infotext:
            kwargs["exif"] = _exif_with_comment(infotext, JPEG_MAX_EXIF if fmt != "webp" else None)
        rgb = img.convert("RGB")
        if fmt == "webp":
            rgb.save(buf, format="WEBP", **kwargs)
        else:
            rgb.save(buf, format="JPEG", **kwargs)
    else:
        raise ValueError(f"unsupported image format {fmt!r} (png, jpeg, webp)")
    return buf.getvalue()


def encode_png_rgb(img: Image.Image, infotext: str | None = None, compress_level: int = 1) -> bytes:
    """An 8-bit RGB PNG with the infotext as PIL writes it (tEXt `parameters`, iTXt when not latin-1).

    Several times faster than PIL's encoder at about the same size: every row uses the PNG "Up"
    filter (computed with numpy) and the rows go through one `deflate` call. The pixels are the
    same; the file bytes differ from PIL's (PIL picks a filter per row)."""
    pixels = np.asarray(img, dtype=np.uint8)
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = PNG_FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])   # uint8: wraps modulo 256 as PNG wants
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    if infotext:
        try:
            chunks.append(_png_chunk(b"tEXt", b"parameters\0" + infotext.encode("latin-1")))
        except UnicodeEncodeError:
            chunks.append(_png_chunk(b"iTXt", b"parameters\0\0\0\0\0" + infotext.encode("utf-8")))
    chunks.append(_png_chunk(b"IDAT", deflate(filtered, compress_level)))
    chunks.append(_png_chunk(b"IEND", b""))
    return PNG_SIGNATURE + b"".join(chunks)


FAST_DEFLATE_LEVELS = range(1, 4)  # ISA-L's levels; 0 (stored) and 4-9 stay zlib's


def deflate(data: bytes | np.ndarray, level: int) -> bytes:
    """A zlib stream of `data` (any contiguous buffer) at `level` 0-9: ISA-L for 1-3 when installed."""
    if isal_zlib is not None and level in FAST_DEFLATE_LEVELS:
        return isal_zlib.compress(data, level)
    return zlib.compress(data, level)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _exif_with_comment(text: str, max_bytes: int | None = None) -> bytes:
    """EXIF holding `text` as a UNICODE UserComment; cut to fit `max_bytes` (one JPEG segment)."""
    payload = text.encode("utf-16-be")
    if max_bytes is not None:
        budget = max_bytes - len(_exif_with_comment(""))
        if len(payload) > budget:  # cut on a character boundary (never half a surrogate pair)
            payload = payload[: budget - budget % 2].decode("utf-16-be", errors="ignore").encode("utf-16-be")
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD_POINTER)[EXIF_USER_COMMENT] = _UNICODE_PREFIX + payload
    return exif.tobytes()


def read_infotext(image_bytes: bytes) -> str:
    """Infotext stored in an image (PNG `parameters`, EXIF UserComment, JPEG comment); "" when none."""
    try:
        img = Image.open(io.BytesIO(image_bytes))
    except Exception as exc:  # noqa: BLE001 - untrusted bytes
        raise ImageDecodeError(f"cannot read image: {exc}") from exc
    params = img.info.get("parameters")
    if isinstance(params, str) and params:
        return params
    comment = img.getexif().get_ifd(EXIF_IFD_POINTER).get(EXIF_USER_COMMENT)
    if comment:
        return _decode_user_comment(comment)
    jpeg_comment = img.info.get("comment")
    if isinstance(jpeg_comment, bytes):
        return jpeg_comment.decode("utf-8", errors="ignore")
    return jpeg_comment or ""


def _decode_user_comment(value: bytes | str) -> str:
    """EXIF UserComment: 8-byte charset prefix + payload (UNICODE is UTF-16, normally big-endian)."""
    if isinstance(value, str):
        return value
    prefix, payload = value[:8], value[8:]
    if prefix == _UNICODE_PREFIX:
        # ASCII-heavy text has its zero bytes first in big-endian; fall back to little-endian if not.
        little = payload[1::2].count(0) > payload[0::2].count(0)
        return payload.decode("utf-16-le" if little else "utf-16-be", errors="ignore").rstrip("\x00")
    if prefix in (_ASCII_PREFIX, b"\x00" * 8):
        return payload.decode("ascii", errors="ignore").rstrip("\x00")
    return value.decode("utf-8", errors="ignore").rstrip("\x00")
