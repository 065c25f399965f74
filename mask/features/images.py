"""Image decoding and detector preprocessing, kept apart from the network (CPU stage of the pipeline).

Every input ends up either as an ``(H, W, 3)`` uint8 RGB array or as an :class:`ImageError` that
names the stage (``read``, ``decode``, ``size``) and the reason.  The rules, in order:

- an empty byte string is refused (``EmptyImageFile``, stage ``read``); a missing or unreadable
  file is refused by :func:`read_image_bytes` (``ImageReadError``, stage ``read``);
- bytes that Pillow cannot identify are refused (``NotAnImage``, stage ``decode``);
- the pixel count is checked from the header, before any pixel is decoded (``ImageTooLarge``,
  stage ``size``); Pillow's own decompression-bomb guard is set to the same limit while the
  header is parsed;
- truncated files are refused (``TruncatedImage``), never padded with grey as Pillow's
  ``LOAD_TRUNCATED_IMAGES`` would do; other decoder failures give ``CorruptImage``;
- the EXIF orientation tag is applied (a phone photo comes out upright); an EXIF block that cannot
  be parsed leaves the image as stored, with a warning in the log;
- modes are mapped to RGB: grayscale and palette are expanded; 16-bit grayscale (``I;16*``,
  ``I``) is scaled by 1/257 (so 65535 → 255), not clipped; 16-bit RGB PNGs are reduced to 8 bits
  by Pillow's PNG decoder (high byte); float images (``F``) are clipped to [0, 255]; CMYK goes
  through Pillow's conversion (Adobe-inverted JPEGs are handled by its decoder; ICC profiles are
  not applied); images with alpha (``RGBA``, ``LA``, ``PA``, palette transparency) are composited
  over white, as a viewer shows them on a white page.

:func:`resize_for_detector` reproduces the reference preprocessing (``get_image_blob``): shorter
side to ``min_size`` unless the longer side would exceed ``max_size``; BGR; mean subtracted; CHW.
The resize is ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
antialias=False)``, the same sampling as OpenCV's ``INTER_LINEAR`` (no antialiasing when shrinking);
the output size is rounded like OpenCV's ``fx``/``fy`` path, and the sampling grid follows the
rounded size (sub-pixel difference from OpenCV's exact ``1/fx``).
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from mask.errors import MaskError

logger = logging.getLogger(__name__)

# BGR means of the caffe-converted BUTD R101 (fact sheet §1); the R152 (v2) model uses zeros.
CAFFE_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)

# Pillow's bomb guard is a module global; set and restore it under a lock.
_PIL_GUARD_LOCK = threading.Lock()


class ImageError(MaskError, ValueError):
    """An input image that cannot be used.

    Attributes:
        stage: where it failed: ``read``, ``decode`` or ``size``.
        message: the reason, naming the input.
        source: the input's name (URI or path) as given by the caller.
    """

    def __init__(self, stage: str, message: str, *, source: str | None = None):
        super().__init__(message)
        self.stage = stage
        self.message = message
        self.source = source


class ImageReadError(ImageError):
    """The file could not be read (missing, a directory, no permission)."""


class EmptyImageFile(ImageError):
    """The file has zero bytes."""


class NotAnImage(ImageError):
    """The bytes are not in any image format Pillow knows."""


class ImageTooLarge(ImageError):
    """The image header declares more pixels than allowed (decompression-bomb guard)."""


class TruncatedImage(ImageError):
    """The image data ends before the image does."""


class CorruptImage(ImageError):
    """The decoder failed on the image data."""


def read_image_bytes(path: str | Path) -> bytes:
    """Read a local image file.

    Args:
        path: file path.

    Returns:
        The file's bytes.

    Raises:
        ImageReadError: missing file, a directory, or an OS error (stage ``read``).
    """
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ImageReadError("read", f"{path}: file not found", source=str(path)) from None
    except IsADirectoryError:
        raise ImageReadError("read", f"{path}: is a directory, not a file", source=str(path)) from None
    except OSError as e:
        raise ImageReadError("read", f"{path}: cannot read: {e}", source=str(path)) from None


def decode_image(data: bytes, *, max_pixels: int, source: str = "<bytes>") -> np.ndarray:
    """Decode image bytes to an upright RGB array (rules in the module docstring).

    Args:
        data: the encoded file (JPEG, PNG, any format Pillow reads).
        max_pixels: refuse images whose header declares more pixels than this.
        source: the input's name, used in error messages.

    Returns:
        ``(H, W, 3)`` uint8 RGB array, EXIF orientation applied.

    Raises:
        ImageError: a subclass naming the stage and reason.
    """
    if len(data) == 0:
        raise EmptyImageFile("read", f"{source}: empty file (0 bytes)", source=source)
    im = _open_guarded(data, max_pixels, source)
    w, h = im.size
    if w <= 0 or h <= 0:
        raise CorruptImage("decode", f"{source}: image header declares size {w}x{h}", source=source)
    if w * h > max_pixels:
        raise ImageTooLarge("size", f"{source}: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} "
                            "(decompression-bomb guard)", source=source)
    try:
        im.load()
    except OSError as e:
        msg = str(e)
        if "truncated" in msg.lower() or "premature end" in msg.lower():
            raise TruncatedImage("decode", f"{source}: truncated image data ({msg})", source=source) from None
        raise CorruptImage("decode", f"{source}: cannot decode {im.format or 'image'}: {msg}",
                           source=source) from None
    except (SyntaxError, ValueError, EOFError, struct.error) as e:
        raise CorruptImage("decode", f"{source}: cannot decode {im.format or 'image'}: {e}",
                           source=source) from None
    im = _apply_exif_orientation(im, source)
    try:
        arr = _to_rgb(im)
    except (OSError, ValueError) as e:
        raise CorruptImage("decode", f"{source}: cannot convert mode {im.mode} to RGB: {e}",
                           source=source) from None
    return np.ascontiguousarray(arr)


def load_image(path: str | Path, *, max_pixels: int) -> np.ndarray:
    """Read and decode a local image file (:func:`read_image_bytes` + :func:`decode_image`)."""
    return decode_image(read_image_bytes(path), max_pixels=max_pixels, source=str(path))


def _open_guarded(data: bytes, max_pixels: int, source: str) -> Image.Image:
    """``Image.open`` (header only) with Pillow's bomb guard set to ``max_pixels``."""
    with _PIL_GUARD_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLarge("size", f"{source}: {e}", source=source) from None
        except UnidentifiedImageError:
            raise NotAnImage("decode", f"{source}: not an image (format not recognised; "
                             f"{len(data)} bytes starting {data[:8]!r})", source=source) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise CorruptImage("decode", f"{source}: cannot parse image header: {e}", source=source) from None
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _apply_exif_orientation(im: Image.Image, source: str) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception as e:  # a broken EXIF block must not lose the image; documented rule
        logger.warning("%s: EXIF orientation unreadable (%s); using the image as stored", source, e)
        return im
    return out if out is not None else im


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)  # (H, W)
        a = np.clip(a, 0, 65535) / 257.0
        g = np.rint(a).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        g = np.rint(np.clip(np.nan_to_num(np.asarray(im, dtype=np.float64)), 0, 255)).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "P":
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def detector_scale(h: int, w: int, min_size: int, max_size: int) -> float:
    """Scale of the reference preprocessing: shorter side → ``min_size``, longer side ≤ ``max_size``.

    Args:
        h, w: original image size.
        min_size: target of the shorter side (reference 600).
        max_size: cap of the longer side (reference 1000).

    Returns:
        The scale factor (resized = original × scale).
    """
    scale = float(min_size) / float(min(h, w))
    if round(scale * max(h, w)) > max_size:
        scale = float(max_size) / float(max(h, w))
    return scale


def resize_for_detector(img: np.ndarray, min_size: int, max_size: int,
                        pixel_mean_bgr: tuple[float, float, float] = CAFFE_PIXEL_MEAN_BGR,
                        ) -> tuple[np.ndarray, float]:
    """RGB uint8 image → the network input blob of the reference (BGR, mean subtracted, CHW).

    Args:
        img: ``(H, W, 3)`` uint8 RGB, as from :func:`decode_image`.
        min_size: shorter side after resizing (unless capped).
        max_size: cap of the longer side.
        pixel_mean_bgr: per-channel mean subtracted in BGR order.

    Returns:
        ``(blob, scale)``: blob is ``(3, H', W')`` float32 with H' = round(H·scale), W' likewise
        (at least 1); scale maps original pixel coordinates to blob coordinates.

    Raises:
        ValueError: the image is not ``(H, W, 3)`` uint8 with H, W ≥ 1.
    """
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or min(img.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {img.shape} dtype {img.dtype}")
    h, w = img.shape[:2]
    scale = detector_scale(h, w, min_size, max_size)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1])).permute(2, 0, 1).float()  # (3, H, W) BGR
    x = x - torch.tensor(pixel_mean_bgr, dtype=torch.float32).view(3, 1, 1)
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=False)[0]  # (3, H', W')
    return x.numpy(), scale
