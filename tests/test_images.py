"""Init-image decoding and resizing, tensor <-> image conversion, infotext in encoded images."""

from __future__ import annotations

import base64
import io
import os
import stat
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pi_axera_sd_service.pipeline.images import (
    ImageDecodeError,
    decode_image_b64,
    decode_image_bytes,
    encode_image,
    image_to_nchw,
    nchw_to_image,
    read_infotext,
    resize_image,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _banded(size: tuple[int, int], horizontal: bool) -> Image.Image:
    """Red image whose first 10 rows (or columns) are green and last 10 blue."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = RED
    if horizontal:
        arr[:10], arr[-10:] = GREEN, BLUE
    else:
        arr[:, :10], arr[:, -10:] = GREEN, BLUE
    return Image.fromarray(arr)


def _is_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool(np.all(np.abs(pixels.astype(int) - np.array(colour)) < 40))


def test_decode_accepts_raw_base64_and_data_uri_with_whitespace():
    img = Image.new("RGB", (8, 6), (10, 20, 30))
    b64 = _png_b64(img)
    wrapped = "\n".join(b64[i : i + 20] for i in range(0, len(b64), 20))
    for text in (b64, f"data:image/png;base64,{wrapped}", b64.rstrip("=")):
        out = decode_image_b64(text, max_pixels=1000)
        assert out.mode == "RGB" and out.size == (8, 6)
        assert out.getpixel((3, 3)) == (10, 20, 30)


@pytest.mark.parametrize("payload", ["not base64 at all!", base64.b64encode(b"plain text").decode(), ""])
def test_undecodable_data_raises_image_decode_error(payload):
    with pytest.raises(ImageDecodeError):
        decode_image_b64(payload, max_pixels=1000)


def test_truncated_image_raises_image_decode_error():
    raw = base64.b64decode(_png_b64(Image.effect_noise((64, 64), 50).convert("RGB")))
    truncated = base64.b64encode(raw[: len(raw) // 2]).decode()
    with pytest.raises(ImageDecodeError):
        decode_image_b64(truncated, max_pixels=10_000)
    with pytest.raises(ImageDecodeError):
        read_infotext(b"\x89PNG not really")


def test_formats_outside_png_jpeg_webp_are_refused():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="GIF")
    with pytest.raises(ImageDecodeError, match="PNG"):
        decode_image_b64(base64.b64encode(buf.getvalue()).decode(), max_pixels=1000)


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    b64 = _png_b64(Image.new("RGB", (100, 100)))

    def must_not_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(ImageDecodeError) as err:
        decode_image_b64(b64, max_pixels=5000)
    assert "5000" in str(err.value) and "max_init_image_pixels" in str(err.value)


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20], arr[:, 20:] = RED, BLUE  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image_b64(base64.b64encode(buf.getvalue()).decode(), max_pixels=10_000)
    assert out.size == (20, 40)
    pixels = np.asarray(out)
    assert _is_colour(pixels[5], RED) and _is_colour(pixels[-5], BLUE)


def test_transparent_areas_become_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = decode_image_b64(_png_b64(img), max_pixels=100)
    assert out.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize(("src_size", "horizontal"), [((100, 50), True), ((50, 100), False)])
def test_resize_and_fill_stretches_edges_instead_of_black(src_size, horizontal):
    out = np.asarray(resize_image(_banded(src_size, horizontal), 2, 64, 64))
    assert out.shape == (64, 64, 3)
    if not horizontal:
        out = out.transpose(1, 0, 2)
    # the fitted image covers rows 16..47; the gaps repeat its green first and blue last rows
    assert _is_colour(out[:14, 2:-2], GREEN)
    assert _is_colour(out[-14:, 2:-2], BLUE)
    assert _is_colour(out[28:36, 2:-2], RED)
    assert not np.any(np.all(out < 20, axis=2))


def test_crop_and_resize_cuts_the_sides_off():
    out = np.asarray(resize_image(_banded((100, 50), horizontal=False), 1, 64, 64))
    assert out.shape == (64, 64, 3)
    assert _is_colour(out[:, 3:-3], RED)  # green/blue side bands were cropped away


def test_just_resize_stretches_everything():
    out = resize_image(_banded((100, 50), horizontal=False), 0, 64, 32)
    arr = np.asarray(out)
    assert out.size == (64, 32)
    assert _is_colour(arr[:, 1], GREEN) and _is_colour(arr[:, -2], BLUE)


def test_tensor_image_round_trip_and_postprocessing():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    nchw = image_to_nchw(img)
    assert nchw.shape == (1, 3, 16, 24) and nchw.dtype == np.float32
    assert nchw.min() >= -1.0 and nchw.max() <= 1.0
    assert np.array_equal(np.asarray(nchw_to_image(nchw)), np.asarray(img))
    # diffusers VaeImageProcessor: clip(x/2+0.5)·255, rounded
    values = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32).reshape(1, 1, 1, 6)
    out = np.asarray(nchw_to_image(np.repeat(values, 3, axis=1)))
    assert out[0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]


INFOTEXT = "a cat, ünïcode 猫\nNegative prompt: dog\nSteps: 4, Sampler: LCM, CFG scale: 1, Seed: 42"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_infotext_round_trip(fmt):
    img = Image.new("RGB", (16, 16), (1, 2, 3))
    data = encode_image(img, fmt, INFOTEXT)
    assert Image.open(io.BytesIO(data)).format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    assert read_infotext(data) == INFOTEXT
    assert read_infotext(encode_image(img, fmt, None)) == ""


def test_png_is_lossless_and_compress_level_matters():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    fast = encode_image(img, "png", None, png_compress_level=0)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fast))), np.asarray(img))
    smooth = Image.new("RGB", (64, 64), (9, 9, 9))
    assert len(encode_image(smooth, "png", None, png_compress_level=9)) < len(
        encode_image(smooth, "png", None, png_compress_level=0)
    )


def test_unknown_output_format_is_refused():
    with pytest.raises(ValueError):
        encode_image(Image.new("RGB", (4, 4)), "bmp", None)


def _encoded(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def test_16_bit_grayscale_png_keeps_its_tones():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = np.asarray(decode_image_bytes(_encoded(Image.fromarray(ramp), "PNG"), max_pixels=10_000))
    assert out.shape == (64, 64, 3)
    expected = np.round(ramp / 257).astype(int)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1  # not saturated to white
    assert np.array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize(
    ("img", "params"),
    [
        (Image.new("RGB", (4, 4), (1, 2, 3)), {"transparency": (1, 2, 3)}),
        (Image.new("L", (4, 4), 7), {"transparency": 7}),
        (Image.new("P", (4, 4), 0), {"transparency": 0}),
        (Image.new("LA", (4, 4), (100, 0)), {}),
    ],
    ids=["rgb-trns", "gray-trns", "palette-trns", "gray-alpha"],
)
def test_transparency_of_any_mode_becomes_white(img, params):
    out = decode_image_bytes(_encoded(img, "PNG", **params), max_pixels=100)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_image_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), GREEN)]
    raw = _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
    assert decode_image_bytes(raw, max_pixels=100).getpixel((2, 2)) == RED


def test_cmyk_jpeg_and_grayscale_decode_to_rgb():
    cmyk = decode_image_bytes(_encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), 100)
    assert cmyk.mode == "RGB" and _is_colour(np.asarray(cmyk), RED)
    gray = decode_image_bytes(_encoded(Image.new("L", (8, 8), 90), "PNG"), 100)
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (90, 90, 90)


def test_corrupt_exif_does_not_reject_good_pixels():
    raw = _encoded(Image.new("RGB", (20, 10), RED), "PNG", exif=b"Exif\x00\x00garbage-data-here")
    out = decode_image_bytes(raw, max_pixels=1000)
    assert out.size == (20, 10) and out.getpixel((3, 3)) == RED


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("size", [(1, 2000), (2000, 1)])
def test_extreme_aspect_ratios_resize_without_huge_intermediates(monkeypatch, mode, size):
    sizes: list[tuple[int, int]] = []
    original = Image.Image.resize

    def recording_resize(self, new_size, *args, **kwargs):
        sizes.append(tuple(new_size))
        return original(self, new_size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = RED
    out = resize_image(Image.fromarray(arr), mode, 512, 512)
    assert out.size == (512, 512)
    # mode 1 the A1111 way builds a 512x1024000 image; at most 4 targets' worth is allowed here
    assert max(w * h for w, h in sizes) <= 4 * 512 * 512
    assert _is_colour(np.asarray(out)[200:300, 200:300], RED)


def _a1111_resize(im: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's `resize_image` steps (modules/images.py, no upscaler), one plain Pillow call each."""
    ratio, src_ratio = width / height, im.width / im.height
    if mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2 and ratio < src_ratio:
        fill = height // 2 - src_h // 2
        res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                  box=(0, fill + src_h))
    elif mode == 2 and ratio > src_ratio:
        fill = width // 2 - src_w // 2
        res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                  box=(fill + src_w, 0))
    return res


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("source", [(640, 480), (300, 900), (900, 300), (97, 513), (1000, 1001), (50, 70)])
def test_crop_and_fill_modes_give_a1111_pixels(mode, source):
    """Noise is the hardest input: any difference in the order of Pillow's passes shows at once."""
    noise = np.random.default_rng(sum(source)).integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    for target in [(512, 512), (512, 384), (384, 640)]:
        ours = np.asarray(resize_image(img, mode, *target), dtype=int)
        theirs = np.asarray(_a1111_resize(img, mode, *target), dtype=int)
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 1, f"mode {mode}, {source} -> {target}"


def test_crop_and_resize_keeps_the_centre_of_a_tall_image():
    arr = np.zeros((300, 100, 3), np.uint8)
    arr[:100], arr[100:200], arr[200:] = GREEN, RED, BLUE
    out = np.asarray(resize_image(Image.fromarray(arr), 1, 64, 64))
    # cover: 100x300 -> 64x192, centre 64 rows are the red middle third
    assert _is_colour(out[4:-4], RED)


def test_jpeg_infotext_too_long_for_exif_is_shortened_not_an_error():
    text = "🐱" * 20_000  # 80 kB as UTF-16: more than one JPEG APP1 segment holds
    data = encode_image(Image.new("RGB", (8, 8)), "jpeg", text)
    stored = read_infotext(data)
    assert stored and text.startswith(stored)
    assert read_infotext(encode_image(Image.new("RGB", (8, 8)), "webp", text)) == text


def test_decode_errors_name_the_problem_not_python_internals() -> None:
    """Clients read this text: no object reprs; a giant image names the setting that raises the limit."""
    with pytest.raises(ImageDecodeError) as not_an_image:
        decode_image_b64(base64.b64encode(b"plain text, not pixels" * 4).decode(), 10**7)
    assert "object at 0x" not in str(not_an_image.value) and "PNG" in str(not_an_image.value)
    header = io.BytesIO()
    Image.new("L", (1, 1)).save(header, "PNG")
    giant = bytearray(header.getvalue())
    giant[16:24] = (40000).to_bytes(4, "big") * 2  # IHDR claims 40000 x 40000 = 1.6 G pixels
    giant[29:33] = zlib.crc32(bytes(giant[12:29])).to_bytes(4, "big")
    with pytest.raises(ImageDecodeError) as bomb:
        decode_image_bytes(bytes(giant), 10**7)
    assert "max_init_image_pixels" in str(bomb.value)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_images_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Like any tool: -rw-r--r-- under the usual umask 022 (they were -rw------- whatever the umask)."""
    from pi_axera_sd_service.service.results import save_images

    previous = os.umask(umask)
    try:
        (path,) = save_images([encode_image(Image.new("RGB", (8, 8)))], tmp_path, "png", "20260101", [7])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
