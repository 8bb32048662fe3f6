"""Decoding a sample's image and label, with the fastest decoder at hand.

libspng (``pyspng``) decodes PNG faster than Pillow's libpng path, about 1.3x for RGB
images and 4x for 8-bit label maps here; libjpeg-turbo through ``simplejpeg`` decodes JPEG
about 1.4x faster than Pillow (``tools/bench_loader.py`` measures them). Both are optional:
without them, or for a file they refuse, Pillow decodes. The CPU geometry works on
Pillow images (one resize per sample in ``seg.data.transforms``); the device geometry takes the
arrays as they come (``png_array``, ``jpeg_array``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

try:
    import pyspng
except ImportError:  # a platform without its wheel: Pillow decodes PNG
    pyspng = None
try:
    import simplejpeg
except ImportError:
    simplejpeg = None


def _pillow(data: bytes, mode: str) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == mode else image.convert(mode)


def png_array(data: bytes, mode: str) -> np.ndarray:
    """(H, W, 3) for ``mode="RGB"`` or (H, W) for ``"L"`` uint8 pixels of PNG bytes; a broken
    file raises."""
    if pyspng is not None:
        array = pyspng.load(data)  # raises on a corrupt or truncated file
        if array.dtype == np.uint8 and (array.ndim == 2 if mode == "L" else array.ndim == 3 and array.shape[2] == 3):
            return array
    return np.array(_pillow(data, mode))  # palette, 16-bit, alpha...: Pillow converts (a writable copy)


def jpeg_array(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 pixels of JPEG bytes; a broken file raises."""
    if simplejpeg is not None:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    return np.array(_pillow(data, "RGB"))


def decode_png(data: bytes, mode: str) -> Image.Image:
    """An RGB (``mode="RGB"``) or 8-bit (``"L"``) Pillow image from PNG bytes."""
    if pyspng is None:
        return _pillow(data, mode)
    return Image.fromarray(png_array(data, mode), mode)


def decode_jpeg(data: bytes) -> Image.Image:
    """An RGB Pillow image from JPEG bytes."""
    return _pillow(data, "RGB") if simplejpeg is None else Image.fromarray(jpeg_array(data), "RGB")
