"""Decoding a sample's image and label, with the fastest decoder at hand.

libspng (``pyspng``) decodes PNG faster than Pillow's libpng path, about 1.3x for RGB
images and 4x for 8-bit label maps here; libjpeg-turbo through ``simplejpeg`` decodes JPEG
about 1.4x faster than Pillow (``tools/bench_loader.py`` measures them). Both are optional:
without them, or for a file they refuse, Pillow decodes. The pipeline works on Pillow
images (one resize per sample in ``seg.transforms``), so the arrays are wrapped, not copied.
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


def decode_png(data: bytes, mode: str) -> Image.Image:
    """An RGB (``mode="RGB"``) or 8-bit (``"L"``) image from PNG bytes; a broken file raises."""
    if pyspng is not None:
        array = pyspng.load(data)  # raises on a corrupt or truncated file
        if array.ndim == 2 and mode == "L" and array.dtype == np.uint8:
            return Image.fromarray(array, "L")
        if array.ndim == 3 and array.shape[2] == 3 and mode == "RGB" and array.dtype == np.uint8:
            return Image.fromarray(array, "RGB")
    return _pillow(data, mode)  # palette, 16-bit, alpha...: Pillow converts


def decode_jpeg(data: bytes) -> Image.Image:
    """An RGB image from JPEG bytes; a broken file raises."""
    if simplejpeg is not None:
        return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"), "RGB")
    return _pillow(data, "RGB")
