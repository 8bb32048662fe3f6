import io

import numpy as np
import pytest
from PIL import Image

from seg.png import encode_gray8


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
