import io

import numpy as np
import pytest
from PIL import Image

from seg.core.png import encode_gray8, encode_rgb8


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (128, 256)])
def test_encode_gray8_round_trips_through_pil(shape):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    array[: shape[0] // 2] = 7  # runs, as in label maps
    decoded = Image.open(io.BytesIO(encode_gray8(array)))
    assert decoded.format == "PNG" and decoded.mode == "L"
    np.testing.assert_array_equal(np.asarray(decoded), array)


def test_encode_gray8_rejects_other_arrays():
    with pytest.raises(ValueError, match="uint8"):
        encode_gray8(np.zeros((4, 4), dtype=np.int32))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        encode_gray8(np.zeros((4, 4, 3), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (64, 128, 3)])
def test_encode_rgb8_round_trips_through_pil_and_the_fast_decoder(shape):
    from seg.data.decode import decode_png

    array = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    data = encode_rgb8(array)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), array)
    np.testing.assert_array_equal(np.asarray(decode_png(data, "RGB")), array)


def test_encode_rgb8_rejects_other_arrays():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        encode_rgb8(np.zeros((4, 4), dtype=np.uint8))


@pytest.mark.parametrize("fast", [True, False], ids=["libspng-simplejpeg", "pillow"])
def test_the_decoders_agree_with_pillow_and_refuse_broken_files(fast, monkeypatch):
    from seg.data import decode

    if not fast:  # the fallback a platform without the wheels gets
        monkeypatch.setattr(decode, "pyspng", None)
        monkeypatch.setattr(decode, "simplejpeg", None)
    elif decode.pyspng is None or decode.simplejpeg is None:
        pytest.skip("pyspng or simplejpeg not installed")
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    label = rng.integers(0, 19, size=(48, 80), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")  # Pillow's own filters, as Cityscapes' PNGs
    png = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    np.testing.assert_array_equal(np.asarray(decode.decode_png(png, "RGB")), image)
    np.testing.assert_array_equal(np.asarray(decode.decode_png(encode_gray8(label), "L")), label)
    np.testing.assert_array_equal(
        np.asarray(decode.decode_jpeg(jpeg)), np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    )
    gray = io.BytesIO()
    Image.fromarray(label).save(gray, "PNG")
    assert decode.decode_png(gray.getvalue(), "RGB").mode == "RGB"  # converted, as Pillow's path does
    for broken in (png[: len(png) // 2], b"not an image"):
        with pytest.raises(Exception):  # noqa: B017 (each decoder raises its own type; data.decode wraps them)
            decode.decode_png(broken, "RGB")
    with pytest.raises(Exception):  # noqa: B017
        decode.decode_jpeg(jpeg[: len(jpeg) // 2])
