"""Images: cleaned of metadata, upright, content-addressed, released when unused."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from sqlalchemy import text

import storage as st
from storage.image_markers import is_clean_jpeg, is_clean_png
from tests.storage_helpers import (
    GPS_IFD,
    MAKE,
    ORIENTATION,
    Configure,
    jpeg_bytes,
    make_conversation,
    make_user,
    phone_jpeg,
    png_bytes,
    png_with_metadata,
    textured_image,
)

pytest_plugins = ("tests.storage_fixtures",)  # the backend, data_dir, storage_config and storage fixtures


def phone_photo(*, latitude: float = 52.37) -> bytes:
    """A 40x20 JPEG, left half red and right half blue, that must be rotated 90° clockwise
    (EXIF orientation 6) and carries a camera make and a GPS position."""
    image = Image.new("RGB", (40, 20), "blue")
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[MAKE] = "SecretCam"
    gps = exif.get_ifd(GPS_IFD)
    gps.update({1: "N", 2: (latitude, 0.0, 0.0), 3: "E", 4: (4.9, 0.0, 0.0)})
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(GPS_IFD)  # the input really has GPS
    return data


def attach(storage: st.Storage, user: st.UserRecord, conversation: st.ConversationRecord, sha256: str) -> None:
    with storage.session() as session:
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="", image_sha256=sha256)


def test_exif_orientation_is_applied_and_all_metadata_removed(storage: st.Storage) -> None:
    record = st.save_image(storage, phone_photo())
    stored = st.image_path(storage, record.sha256).read_bytes()
    with Image.open(io.BytesIO(stored)) as image:
        assert (record.width, record.height, record.format) == (20, 40, "JPEG")
        assert image.size == (20, 40)
        red, blue = image.convert("RGB").getpixel((10, 5)), image.convert("RGB").getpixel((10, 35))
        assert red[0] > 200 and red[2] < 60 and blue[2] > 200 and blue[0] < 60  # turned upright
        assert not image.getexif() and "exif" not in image.info and "xmp" not in image.info
    assert b"Exif" not in stored and b"SecretCam" not in stored
    assert record.size_bytes == len(stored)


def test_the_same_photo_is_stored_once(storage: st.Storage) -> None:
    first = st.save_image(storage, phone_photo(latitude=52.0))
    second = st.save_image(storage, phone_photo(latitude=48.8))  # same pixels, other metadata
    other = st.save_image(storage, png_bytes())
    assert first == second and other.sha256 != first.sha256 and other.format == "PNG"
    files = sorted(p for p in storage.images_dir.rglob("*") if p.is_file())
    assert [p.stem for p in files] == sorted([first.sha256, other.sha256])
    assert not list(storage.images_dir.rglob(".tmp-*"))


def test_photo_bytes_are_files_on_sqlite_and_in_the_database_when_shared(storage: st.Storage) -> None:
    record = st.save_image(storage, png_bytes())
    path = st.image_path(storage, record.sha256)
    assert path.is_relative_to(storage.images_dir) and path.stat().st_size == record.size_bytes
    with storage.engine.connect() as connection:
        kept = connection.execute(text("SELECT sha256 FROM image_blobs")).scalars().all()
    assert kept == ([record.sha256] if storage.config.is_shared else [])  # PostgreSQL: every replica reads them


def test_deleting_a_conversation_releases_images_no_one_else_uses(storage: st.Storage) -> None:
    user = make_user(storage, "ana")
    shared, alone = st.save_image(storage, jpeg_bytes(color="green")), st.save_image(storage, png_bytes())
    first, second = make_conversation(storage, user), make_conversation(storage, user)
    attach(storage, user, first, shared.sha256)
    attach(storage, user, first, alone.sha256)
    attach(storage, user, second, shared.sha256)
    with storage.session() as session:
        st.delete_conversation(session, owner_id=user.id, conversation_id=first.id)
    assert st.image_path(storage, shared.sha256).is_file()
    with pytest.raises(st.ImageNotFoundError):
        st.image_path(storage, alone.sha256)
    with storage.session() as session:
        st.delete_messages_from(session, owner_id=user.id, conversation_id=second.id, position=0)
    with pytest.raises(st.ImageNotFoundError):
        st.image_path(storage, shared.sha256)


def test_a_rolled_back_delete_keeps_the_files(storage: st.Storage) -> None:
    user = make_user(storage, "ana")
    image = st.save_image(storage, png_bytes())
    conversation = make_conversation(storage, user)
    attach(storage, user, conversation, image.sha256)
    with pytest.raises(RuntimeError), storage.session() as session:
        st.delete_conversation(session, owner_id=user.id, conversation_id=conversation.id)
        raise RuntimeError("changed my mind")
    assert st.image_path(storage, image.sha256).is_file()
    with storage.session() as session:
        assert st.get_image(session, sha256=image.sha256) == image


def test_startup_removes_unattached_images_and_stray_files(storage_config: Configure) -> None:
    config = storage_config(unattached_photo_grace_s=0.001)  # a shared database waits that long for a send
    opened = st.open_storage(config)
    user = make_user(opened, "ana")
    kept, orphan = st.save_image(opened, png_bytes()), st.save_image(opened, jpeg_bytes())
    attach(opened, user, make_conversation(opened, user), kept.sha256)
    stray = config.images_dir / "ab" / ".tmp-crashed.part"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"half a photo")
    opened.close()
    reopened = st.open_storage(config)
    assert st.image_path(reopened, kept.sha256).is_file()
    with pytest.raises(st.ImageNotFoundError):
        st.image_path(reopened, orphan.sha256)
    assert not stray.exists()
    reopened.close()


@pytest.mark.parametrize("name", ["../../etc/passwd", "A" * 64, "0" * 63, "", "0" * 64 + "/.."])
def test_image_path_accepts_only_sha256_names(storage: st.Storage, name: str) -> None:
    with pytest.raises(st.ImageNotFoundError):
        st.image_path(storage, name)


def test_image_limits(storage_config: Configure) -> None:
    limits = st.StorageLimits(max_image_bytes=50_000, max_image_pixels=10_000)
    opened = st.open_storage(storage_config(limits=limits))
    with pytest.raises(st.LimitExceededError, match="MB") as too_big:
        st.save_image(opened, b"\xff" * 50_001)
    assert too_big.value.limit_name == "max_image_bytes"
    with pytest.raises(st.LimitExceededError, match="pixels") as too_many:
        st.save_image(opened, png_bytes(size=(101, 100)))
    assert (too_many.value.limit_name, too_many.value.actual) == ("max_image_pixels", 10_100)
    st.save_image(opened, png_bytes(size=(100, 100)))
    opened.close()


def test_decompression_bomb_is_refused_before_decoding(storage: st.Storage) -> None:
    # An 8000x8000 PNG of one colour is ~10 KB on disk but 64 MP (192 MB as RGB) decoded.
    buffer = io.BytesIO()
    Image.new("1", (8_000, 8_000)).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(st.LimitExceededError) as error:
        st.save_image(storage, buffer.getvalue())
    assert error.value.limit_name == "max_image_pixels"


@pytest.mark.parametrize("data", [b"", b"not an image at all", jpeg_bytes()[:200], b"%PDF-1.7\n"])
def test_non_images_and_truncated_files_are_refused(storage: st.Storage, data: bytes) -> None:
    with pytest.raises(st.InvalidImageError, match="could not be read as a photo"):
        st.save_image(storage, data)
    assert not [p for p in storage.images_dir.rglob("*") if p.is_file()]


def test_rgba_png_stays_lossless_png(storage: st.Storage) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (10, 20, 30, 128)).save(buffer, "PNG")
    record = st.save_image(storage, buffer.getvalue())
    with Image.open(st.image_path(storage, record.sha256)) as image:
        assert (record.format, image.mode, image.getpixel((0, 0))) == ("PNG", "RGBA", (10, 20, 30, 128))


def test_heic_uploads_are_stored_as_jpeg(storage: st.Storage) -> None:
    from pillow_heif import register_heif_opener

    register_heif_opener()
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), "red").save(buffer, "HEIF")
    record = st.save_image(storage, buffer.getvalue())
    assert (record.format, record.width, record.height, record.mime_type) == ("JPEG", 16, 12, "image/jpeg")


def encoded(format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    textured_image((32, 24), seed=3).save(buffer, format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "clean"),
    [
        (encoded("JPEG", quality=92, optimize=True), True),
        (encoded("JPEG", progressive=True), True),
        (encoded("JPEG", restart_marker_blocks=2), True),
        (encoded("PNG"), True),
        (phone_jpeg(), False),
        (encoded("JPEG", comment=b"taken at home"), False),
        (encoded("JPEG", icc_profile=b"\0" * 128), False),
        (encoded("JPEG") + b"more", False),
        (encoded("JPEG")[:-10], False),
        (png_with_metadata(), False),
        (encoded("PNG", dpi=(72, 72)), False),
        (encoded("PNG") + b"more", False),
    ],
)
def test_only_files_holding_nothing_but_the_picture_count_as_clean(data: bytes, clean: bool) -> None:
    assert (is_clean_jpeg(data) or is_clean_png(data)) is clean


def test_a_16_bit_gradient_png_is_stored_with_its_gradient(storage: st.Storage) -> None:
    """Issue 14: a 16-bit grayscale PNG (scanners, raw converters) was clipped to 8 bits and stored white."""
    import numpy as np

    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    source = io.BytesIO()
    Image.fromarray(ramp).save(source, "PNG")
    record = st.save_image(storage, source.getvalue())
    with Image.open(st.image_path(storage, record.sha256)) as stored:
        assert stored.mode == "RGB"
        row = np.asarray(stored)[4, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(int(row[128]) - 128) <= 1
    assert np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 200


def png_48_bit_gradient(width: int = 256, height: int = 4) -> bytes:
    """A 16-bit-per-channel RGB PNG (a red ramp), written by hand: Pillow has no mode to save one."""
    import struct
    import zlib

    import numpy as np

    ramp = np.linspace(0, 65535, width).astype(">u2")
    pixel_row = np.stack([ramp, np.zeros_like(ramp), np.zeros_like(ramp)], axis=1).tobytes()
    raw = b"".join(b"\0" + pixel_row for _ in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_a_48_bit_rgb_png_is_stored_with_its_gradient(storage: st.Storage) -> None:
    import numpy as np

    record = st.save_image(storage, png_48_bit_gradient())
    with Image.open(st.image_path(storage, record.sha256)) as stored:
        row = np.asarray(stored.convert("RGB"))[1, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(int(row[128]) - 128) <= 1 and np.all(np.diff(row) >= 0)
