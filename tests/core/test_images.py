"""User photos: every common format decodes to the RGB image a person expects, bad data is refused."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mipha_core import ImageTooLargeError, InvalidImageError, load_image
from mipha_core.images import to_rgb
from mipha_core.preprocessing import MAX_SIDE, pad_and_resize, shrink_to_side


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_padding_centres_the_image_on_the_mean_colour():
    """Resized to its own square, ``pad_and_resize`` is pure padding: Mipha's ``expand2square``."""
    image = Image.new("RGB", (300, 100), (10, 200, 30))
    square = pad_and_resize(image, (300, 300), background=(127, 127, 127))
    assert square.size == (300, 300)
    assert square.getpixel((0, 0)) == (127, 127, 127)
    assert square.getpixel((150, 99)) == (127, 127, 127)
    assert square.getpixel((150, 100)) == (10, 200, 30)
    assert square.getpixel((150, 199)) == (10, 200, 30)
    assert square.getpixel((150, 200)) == (127, 127, 127)
    tall = pad_and_resize(Image.new("RGB", (101, 300), (1, 2, 3)), (300, 300), background=(127, 127, 127))
    assert tall.getpixel((99, 150)) == (1, 2, 3) and tall.getpixel((98, 150)) == (127, 127, 127)


def test_preprocessing_pads_with_background_before_resizing(engine):
    wide = Image.new("RGB", (400, 100), (255, 0, 0))
    pixels = engine.preprocessor(wide)
    assert pixels.shape == (1, 3, 384, 384)
    top_left = pixels[0, :, 0, 0]
    assert np.allclose(top_left.numpy(), (127 / 255 - 0.5) / 0.5, atol=1e-6)
    centre = pixels[0, :, 192, 192].numpy()
    assert np.allclose(centre, [1.0, -1.0, -1.0], atol=1e-6)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_common_formats_decode_to_rgb(fmt):
    source = Image.new("RGB", (64, 48), (250, 250, 250))
    source.paste((0, 0, 0), (0, 0, 32, 48))
    image = load_image(encoded(source, fmt))
    assert image.mode == "RGB" and image.size == (64, 48)
    assert image.getpixel((5, 5))[0] < 40 and image.getpixel((60, 5))[0] > 200


def test_heic_photos_decode():
    pillow_heif = pytest.importorskip("pillow_heif")
    source = Image.new("RGB", (64, 48), (20, 120, 220))
    buffer = io.BytesIO()
    pillow_heif.from_pillow(source).save(buffer, format="HEIF", quality=90)
    image = load_image(buffer.getvalue())
    assert image.size == (64, 48)
    assert abs(image.getpixel((32, 24))[2] - 220) < 20


def test_exif_orientation_is_applied():
    source = Image.new("RGB", (60, 30), (255, 255, 255))
    source.paste((0, 0, 0), (0, 0, 10, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image = load_image(encoded(source, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (30, 60)
    assert image.getpixel((15, 2))[0] < 60 and image.getpixel((15, 57))[0] > 200


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode):
    source = Image.new(mode, (20, 20), (0, 0) if mode == "LA" else (0, 0, 0, 0))
    image = load_image(encoded(source, "PNG"))
    assert image.getpixel((10, 10)) == (255, 255, 255)


def test_palette_transparency_is_composited_on_white():
    source = Image.new("P", (20, 20), 1)
    source.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    source.paste(0, (0, 0, 10, 20))
    image = load_image(encoded(source, "PNG", transparency=0))
    assert image.getpixel((5, 5)) == (255, 255, 255) and image.getpixel((15, 5)) == (255, 0, 0)


def test_grayscale_cmyk_and_16_bit_convert():
    assert load_image(encoded(Image.new("L", (8, 8), 90), "PNG")).getpixel((1, 1)) == (90, 90, 90)
    cmyk = load_image(encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    red, green, blue = cmyk.getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60
    deep = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    value = load_image(encoded(deep, "PNG")).getpixel((3, 3))
    assert value == (156, 156, 156)


def gradient_16_bit(width: int = 256, height: int = 8) -> Image.Image:
    """A scanner-style 16-bit grayscale ramp from black to white."""
    return Image.fromarray(np.tile(np.linspace(0, 65535, width).astype(np.uint16), (height, 1)))


def test_a_16_bit_gradient_keeps_its_gradient():
    """Clipped to 8 bits, all but the darkest 0.4 % of the ramp turned white (issue 14)."""
    row = np.asarray(load_image(encoded(gradient_16_bit(), "PNG")))[4, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 200
    assert abs(int(row[128]) - 128) <= 1


@pytest.mark.parametrize(("values", "middle"), [
    (np.linspace(0, 1, 256, dtype=np.float32), 128),  # float in [0, 1]
    (np.linspace(0, 4000, 256, dtype=np.float32), 128),  # float beyond 1: scaled by its peak
    (np.linspace(0, 200_000, 256).astype(np.int32), 128),  # 32-bit integers beyond 16 bits
])
def test_float_and_32_bit_photos_are_scaled_by_their_range(values, middle):
    row = np.asarray(to_rgb(Image.fromarray(np.tile(values, (4, 1)))))[1, :, 0].astype(int)
    assert row[-1] == 255 and abs(int(row[128]) - middle) <= 1


def test_animation_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert load_image(data).getpixel((8, 8))[0] > 200


def test_undecodable_data_is_refused():
    with pytest.raises(InvalidImageError, match="not an image"):
        load_image(b"%PDF-1.4 definitely not a photo")
    truncated = encoded(Image.new("RGB", (200, 200), (1, 2, 3)), "JPEG")[:300]
    with pytest.raises(InvalidImageError):
        load_image(truncated)


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header():
    with pytest.raises(ImageTooLargeError, match="resize it"):
        load_image(png_header_only(100_000, 100_000))
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        load_image(png_header_only(9_000, 9_000))


def test_pixel_limit_is_configurable():
    data = encoded(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageTooLargeError, match="10,000 pixels"):
        load_image(data, max_pixels=5_000)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def converted_at_once(image: Image.Image) -> Image.Image:
    """The conversion as it was written before it worked in bands: the reference it must match."""
    if image.mode.startswith("I;16") or image.mode in {"I", "F"}:
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0)
        if image.mode == "F":
            scale = 255.0 if peak <= 1.0 else 255.0 / peak
        else:
            scale = 255.0 / peak if image.mode == "I" and peak > 65535 else 255.0 / 65535.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def noise(mode: str, size: tuple[int, int] = (1100, 1000)) -> Image.Image:
    """Random pixels in ``mode``, more than one conversion band tall."""
    rng = np.random.default_rng(7)
    width, height = size
    arrays = {
        "I;16": lambda: rng.integers(0, 65536, (height, width), dtype=np.uint16),
        "I": lambda: rng.integers(-1000, 70000, (height, width), dtype=np.int32),
        "F": lambda: rng.random((height, width), dtype=np.float32),
        "F>1": lambda: rng.random((height, width), dtype=np.float32) * 300,
    }
    if mode in arrays:
        return Image.fromarray(arrays[mode]())
    if mode.startswith("P"):
        paletted = Image.fromarray(rng.integers(0, 64, (height, width), dtype=np.uint8))
        paletted.putpalette(rng.integers(0, 256, 64 * 3, dtype=np.uint8).tobytes())
        if mode == "P+transparency":
            paletted.info["transparency"] = 5
        return paletted
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "F>1", "RGBA", "LA", "P+transparency", "P", "CMYK", "L", "1"])
def test_converting_in_bands_matches_converting_at_once(mode):
    image = noise(mode)
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == image.size
    assert np.array_equal(np.asarray(converted), np.asarray(converted_at_once(image)))


def test_rgb_needs_no_conversion():
    image = Image.new("RGB", (10, 10))
    assert to_rgb(image) is image


def test_only_sides_past_the_bound_are_shrunk():
    at_bound = Image.new("RGB", (MAX_SIDE, 3))
    assert shrink_to_side(at_bound, MAX_SIDE) is at_bound
    assert shrink_to_side(Image.new("RGB", (MAX_SIDE + 1, 3)), MAX_SIDE).size == (MAX_SIDE // 2 + 1, 2)
    assert shrink_to_side(Image.new("RGB", (5, 3 * MAX_SIDE)), MAX_SIDE).size == (2, MAX_SIDE)


def test_preprocessing_composites_transparency_like_decoding(engine):
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    pixels = engine.preprocessor(clear)
    assert torch.equal(pixels, engine.preprocessor(load_image(encoded(clear, "PNG"))))
    assert float(pixels.min()) == pytest.approx(1.0)


def test_a_very_wide_photo_is_preprocessed_not_refused(engine):
    """Past ``MAX_SIDE`` the photo is shrunk first: the strip in the middle still shows."""
    strip = Image.new("RGB", (MAX_SIDE * 2 + 10, 300), (255, 0, 0))
    pixels = engine.preprocessor(strip)
    assert pixels.shape == (1, 3, 384, 384)
    assert pixels[0, :, 192, 192].tolist() == pytest.approx([1.0, -1.0, -1.0], abs=0.02)
    assert pixels[0, :, 0, 192].tolist() == pytest.approx([127 / 255 * 2 - 1] * 3, abs=1e-6)
