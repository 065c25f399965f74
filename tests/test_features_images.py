"""Image decoding rules on real photographs (skimage.data) and crafted broken files; detector resize."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mask.features.images import (
    CAFFE_PIXEL_MEAN_BGR,
    CorruptImage,
    EmptyImageFile,
    ImageError,
    ImageReadError,
    ImageTooLarge,
    NotAnImage,
    TruncatedImage,
    decode_image,
    detector_scale,
    load_image,
    read_image_bytes,
    resize_for_detector,
)

MAX = 90_000_000


def encode(arr_or_img, fmt: str, **kw) -> bytes:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes | None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB or absurd headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(raw_rows if raw_rows is not None else b"\x00")
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_real_rgb_photos_roundtrip_png_exactly(name):
    arr = getattr(data, name)()
    out = decode_image(encode(arr, "PNG"), max_pixels=MAX, source=name)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_real_photo_jpeg_decodes_close():
    arr = data.astronaut()
    out = decode_image(encode(arr, "JPEG", quality=95), max_pixels=MAX, source="astronaut.jpg")
    assert out.shape == arr.shape
    assert np.abs(out.astype(int) - arr.astype(int)).mean() < 3


def test_grayscale_camera_expands_to_three_equal_channels():
    cam = data.camera()
    out = decode_image(encode(cam, "PNG"), max_pixels=MAX, source="camera.png")
    assert out.shape == (*cam.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], cam)


def test_zero_bytes():
    with pytest.raises(EmptyImageFile) as e:
        decode_image(b"", max_pixels=MAX, source="empty.jpg")
    assert e.value.stage == "read" and "empty.jpg" in str(e.value) and "0 bytes" in str(e.value)


def test_text_file_is_not_an_image():
    with pytest.raises(NotAnImage) as e:
        decode_image(b"hello, this is a caption file\n", max_pixels=MAX, source="notes.txt")
    assert e.value.stage == "decode" and "notes.txt" in e.value.message


def test_truncated_jpeg_is_refused_not_padded():
    full = encode(data.chelsea(), "JPEG", quality=90)
    with pytest.raises(TruncatedImage) as e:
        decode_image(full[: len(full) // 2], max_pixels=MAX, source="cut.jpg")
    assert e.value.stage == "decode" and "truncated" in e.value.message


def test_corrupt_png_data():
    good = encode(data.coffee(), "PNG")
    bad = bytearray(good)
    mid = len(bad) // 2
    bad[mid:mid + 64] = bytes(64)  # garbage in the compressed stream (CRC no longer matches)
    with pytest.raises(ImageError) as e:
        decode_image(bytes(bad), max_pixels=MAX, source="broken.png")
    assert e.value.stage == "decode"
    assert isinstance(e.value, CorruptImage | TruncatedImage)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageReadError) as e:
        read_image_bytes(tmp_path / "nope.jpg")
    assert e.value.stage == "read" and "not found" in e.value.message
    with pytest.raises(ImageReadError):
        load_image(tmp_path, max_pixels=MAX)


def test_load_image_from_disk(tmp_path):
    p = tmp_path / "c.png"
    p.write_bytes(encode(data.chelsea(), "PNG"))
    np.testing.assert_array_equal(load_image(p, max_pixels=MAX), data.chelsea())


def test_cmyk_jpeg_converts_to_rgb():
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (200, 30, 30)
    rgb[:, 30:] = (30, 30, 200)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    out = decode_image(encode(cmyk, "JPEG", quality=95), max_pixels=MAX, source="cmyk.jpg")
    assert out.shape == (40, 60, 3)
    assert np.abs(out[5:35, 5:25].astype(int) - [200, 30, 30]).max() < 20
    assert np.abs(out[5:35, 35:55].astype(int) - [30, 30, 200]).max() < 20


def test_rgba_png_composited_on_white():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (10, 200, 30, 255)  # opaque green
    rgba[:, 10:] = (10, 200, 30, 0)  # fully transparent
    out = decode_image(encode(rgba, "PNG"), max_pixels=MAX, source="a.png")
    np.testing.assert_array_equal(out[:, :10], np.broadcast_to([10, 200, 30], (20, 10, 3)))
    np.testing.assert_array_equal(out[:, 10:], np.full((20, 10, 3), 255))


def test_la_and_palette_transparency():
    la = Image.fromarray(np.stack([np.full((8, 8), 100, np.uint8), np.full((8, 8), 0, np.uint8)], -1), "LA")
    assert (decode_image(encode(la, "PNG"), max_pixels=MAX, source="la.png") == 255).all()
    p = Image.new("P", (8, 8), 0)
    p.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    p.info["transparency"] = 0
    out = decode_image(encode(p, "PNG", transparency=0), max_pixels=MAX, source="p.png")
    assert (out == 255).all()


def test_16bit_grayscale_png_scaled_not_clipped():
    g = np.array([[0, 257, 32896], [65535, 1000, 60000]], np.uint16)
    out = decode_image(encode(Image.fromarray(g), "PNG"), max_pixels=MAX, source="g16.png")
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[:, :, 0], np.rint(g / 257.0).astype(np.uint8))


def test_16bit_rgb_png_reduced_to_8bit():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 65536, (4, 5, 3)).astype(">u2")
    rows = b"".join(b"\x00" + v[i].tobytes() for i in range(4))
    out = decode_image(png_bytes(5, 4, 16, 2, rows), max_pixels=MAX, source="rgb16.png")
    assert out.shape == (4, 5, 3)
    assert np.abs(out.astype(int) - v.astype(int) / 257.0).max() <= 1.0


def test_exif_rotation_applied():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)  # left half red
    arr[:, 30:] = (0, 0, 255)  # right half blue
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = decode_image(encode(im, "JPEG", quality=95, exif=exif.tobytes()), max_pixels=MAX, source="phone.jpg")
    assert out.shape == (60, 40, 3)  # upright: portrait
    assert out[5:25, :, 0].mean() > 200 and out[5:25, :, 2].mean() < 50  # left half → top
    assert out[35:55, :, 2].mean() > 200 and out[35:55, :, 0].mean() < 50


def test_huge_header_refused_before_decoding():
    bomb = png_bytes(100_000, 100_000, 8, 2, None)  # 10^10 pixels declared, a few bytes of data
    with pytest.raises(ImageTooLarge) as e:
        decode_image(bomb, max_pixels=MAX, source="bomb.png")
    assert e.value.stage == "size" and "bomb.png" in e.value.message


@pytest.mark.parametrize("side", [40, 60])  # 1600 px: over the limit; 3600: over twice the limit
def test_bomb_guard_follows_max_pixels(side):
    b = encode(np.zeros((side, side, 3), np.uint8), "PNG")
    with pytest.raises(ImageTooLarge) as e:
        decode_image(b, max_pixels=1500, source="s.png")
    assert e.value.stage == "size"
    assert decode_image(b, max_pixels=side * side, source="s.png").shape == (side, side, 3)
    assert Image.MAX_IMAGE_PIXELS != 1500  # Pillow's global is restored


def test_detector_scale_rule():
    assert detector_scale(480, 640, 600, 1000) == pytest.approx(1.25)
    assert detector_scale(300, 1000, 600, 1000) == pytest.approx(1.0)  # 600/300·1000 > 1000 → capped
    assert detector_scale(1200, 1600, 600, 1000) == pytest.approx(0.5)


def naive_bilinear(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Half-pixel bilinear (OpenCV INTER_LINEAR / align_corners=False), loops."""
    h, w = img.shape[:2]
    out = np.zeros((oh, ow, img.shape[2]))
    for i in range(oh):
        sy = max((i + 0.5) * h / oh - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), h - 1)
        y1 = min(y0 + 1, h - 1)
        fy = sy - y0
        for j in range(ow):
            sx = max((j + 0.5) * w / ow - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            fx = sx - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                         + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))
    return out


def test_resize_matches_naive_bilinear_bgr_mean(rng):
    img = rng.integers(0, 256, (9, 13, 3)).astype(np.uint8)
    blob, scale = resize_for_detector(img, min_size=14, max_size=100)
    assert scale == pytest.approx(14 / 9)
    oh, ow = round(9 * scale), round(13 * scale)
    assert blob.shape == (3, oh, ow) and blob.dtype == np.float32
    ref = naive_bilinear(img[:, :, ::-1].astype(np.float64) - np.array(CAFFE_PIXEL_MEAN_BGR), oh, ow)
    np.testing.assert_allclose(blob.transpose(1, 2, 0), ref, atol=1e-3)


def test_resize_uniform_colour_and_zero_mean_variant():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:] = (10, 20, 30)  # RGB
    blob, _ = resize_for_detector(img, 30, 1000, pixel_mean_bgr=(0.0, 0.0, 0.0))
    np.testing.assert_allclose(blob[:, 0, 0], [30, 20, 10])  # BGR order


def test_resize_extreme_aspect_keeps_one_pixel():
    blob, scale = resize_for_detector(np.zeros((1, 5000, 3), np.uint8), 600, 1000)
    assert blob.shape == (3, 1, 1000) and scale == pytest.approx(0.2)


def test_resize_rejects_wrong_arrays():
    with pytest.raises(ValueError, match="uint8 RGB"):
        resize_for_detector(np.zeros((4, 4), np.uint8), 600, 1000)
    with pytest.raises(ValueError):
        resize_for_detector(np.zeros((4, 4, 3), np.float32), 600, 1000)
