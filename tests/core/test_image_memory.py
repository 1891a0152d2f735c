"""Photos that pass the pixel-count check but have an extreme shape, a deep or paletted mode or
an EXIF rotation are decoded and preprocessed within a fixed memory budget.

Each photo is measured in its own forked child of one helper process: the kernel's peak
resident size (VmHWM, reset through /proc/self/clear_refs) minus the size before.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset"),
]

BUDGET = 640 * 1024**2
"""Decoded photo plus its RGB copy at the 64-megapixel limit is 512 MB; the rest is bands."""

CHILD = textwrap.dedent("""
    import json, os, re, resource, sys
    from pathlib import Path
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from mipha_core.images import load_image
    from mipha_core.preprocessing import ImagePreprocessor

    siglip = SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    preprocessor = ImagePreprocessor(siglip)

    def status_bytes(field):
        status = Path("/proc/self/status").read_text()
        return int(re.search(field + r":\\s+(\\d+) kB", status).group(1)) * 1024

    def measure(path):
        cap = status_bytes("VmSize") + 4 * 1024**3  # a failure is a MemoryError, not a machine out of memory
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        Path("/proc/self/clear_refs").write_text("5")
        before = status_bytes("VmHWM")
        pixels = preprocessor(load_image(Path(path)))
        extra = status_bytes("VmHWM") - before
        return {"extra": extra, "shape": list(pixels.shape), "centre": pixels[0, :, 192, 192].tolist()}

    for path in sys.argv[1:]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                result = measure(path)
            except BaseException as error:  # the child must not go on with the loop: the test reports it
                result = {"error": repr(error)}
            finally:
                os.write(write, json.dumps(result).encode())
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as answer:
            print(answer.read())
        os.waitpid(pid, 0)
""")


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def panorama_png() -> bytes:
    """The report's file: 65535×610, a 1-bit PNG of a few kilobytes, dark on the left."""
    image = Image.new("1", (65535, 610), 1)
    ImageDraw.Draw(image).rectangle((0, 0, 3000, 609), fill=0)
    return saved(image, "PNG")


def rotated_jpeg() -> bytes:
    """24000×600 with EXIF orientation 6: it becomes a 600×24000 tower, past ``MAX_SIDE``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return saved(Image.new("RGB", (24000, 600), (30, 120, 200)), "JPEG", exif=exif.tobytes(), quality=80)


def wide_gif() -> bytes:
    image = Image.new("P", (65535, 900), 1)
    image.putpalette([0, 0, 0, 30, 120, 200] + [0] * 762)
    return saved(image, "GIF")


def deep_gray_tiff() -> bytes:
    """48 MP of 16-bit gray: converting it through float64 in one piece took 1.5 GB."""
    return saved(Image.new("I;16", (8000, 6000), 40000), "TIFF", compression="tiff_adobe_deflate")


PHOTOS = {"panorama.png": panorama_png, "tower.jpg": rotated_jpeg, "wide.gif": wide_gif, "deep.tif": deep_gray_tiff}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("extreme-photos")
    paths = []
    for name, make in PHOTOS.items():
        paths.append(folder / name)
        paths[-1].write_bytes(make())
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], cwd=root, capture_output=True,
                            text=True, check=True, timeout=300)
    return {name: json.loads(line) for name, line in zip(PHOTOS, result.stdout.splitlines(), strict=True)}


@pytest.mark.parametrize("name", list(PHOTOS))
def test_extreme_photos_are_preprocessed_within_the_budget(measured, name):
    result = measured[name]
    assert "error" not in result, result
    assert result["shape"] == [1, 3, 384, 384]
    assert result["extra"] < BUDGET, f"{name} took {result['extra'] / 1024**2:.0f} MB"


def test_the_reported_panorama_is_seen_not_refused(measured):
    """The few-kilobyte PNG from the report (it used to take a 17 GB canvas): white on the right of
    its dark start, so the centre of the model's input is white."""
    assert measured["panorama.png"]["extra"] < 512 * 1024**2
    assert measured["panorama.png"]["centre"] == pytest.approx([1.0, 1.0, 1.0], abs=0.01)


@pytest.mark.parametrize("name", ["tower.jpg", "wide.gif"])
def test_the_photo_colour_reaches_the_model(measured, name):
    expected = [(value / 255 - 0.5) / 0.5 for value in (30, 120, 200)]
    assert measured[name]["centre"] == pytest.approx(expected, abs=0.05)
