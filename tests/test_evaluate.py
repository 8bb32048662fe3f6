import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from seg.augment import DeviceAugment
from seg.checkpoint import export_weights
from seg.cityscapes import ID_TO_TRAINID
from seg.config import load_config, to_dict
from seg.data import EvalStream, shards_of
from seg.inference import TestTimeAugmentation, predict_probabilities
from seg.metrics import ConfusionMatrix
from seg.model import DeepLabV3Plus
from seg.pack import Options, pack
from seg.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_and_shards(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    make_synthetic(root / "cityscapes", counts={"train": 4, "val": 5, "test": 0},
                   cities={"train": 2, "val": 2, "test": 1}, size=(64, 32), progress=False)  # fmt: skip
    pack(root / "cityscapes", root / "shards", Options(folds=2, splits=("train", "val")), progress=False)
    torch.manual_seed(0)
    model = DeepLabV3Plus(18, 8).eval()
    config = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={root / 'shards'}", "model.output_stride=8"])
    export_weights(model, root / "model.safetensors", {"config": to_dict(config), "metrics": {}})
    return root / "model.safetensors", root / "shards"


def test_evaluate_matches_the_metrics_module_and_an_independent_count_of_the_exported_pngs(model_and_shards, tmp_path):
    model_path, shards = model_and_shards
    done = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), str(model_path), "--out",
                           str(tmp_path / "out"), "--export", str(tmp_path / "png"), "--workers", "0"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["samples"] == result["expected"] == 5
    for name in ("metrics.md", "per_class_iou.png", "confusion.png", "frequency_vs_iou.png"):
        assert (tmp_path / "out" / name).is_file()

    # the metrics module, on predictions made here
    torch.manual_seed(0)
    model = DeepLabV3Plus(18, 8).eval()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(model_path))
    normalise = DeviceAugment("none")
    matrix = ConfusionMatrix()
    labels = {}
    for item in EvalStream(shards_of(shards, ["val"])):
        with torch.no_grad():
            logits = model(normalise(item["image"][None], train=False)[0])
        matrix.update(logits.argmax(1)[0], item["label"])
        labels[item["key"]] = item["label"].numpy().astype(np.int64)
    assert result["miou"] == pytest.approx(matrix.compute()["miou"], abs=1e-12)

    # an independent count on the written PNGs (official ids, mapped back to trainIds)
    confusion = np.zeros((19, 19), dtype=np.int64)
    for key, label in labels.items():
        predicted = ID_TO_TRAINID[np.asarray(Image.open(tmp_path / "png" / f"{key}_labelIds.png"))].astype(np.int64)
        valid = label != 255
        confusion += np.bincount(label[valid] * 19 + predicted[valid], minlength=361).reshape(19, 19)
    tp, union = np.diag(confusion), confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    assert result["miou"] == pytest.approx(float(np.mean(tp[union > 0] / union[union > 0])), abs=1e-12)
    assert len(list((tmp_path / "png").glob("*_labelIds.png"))) == 5


def test_sliding_windows_and_flips_average_views():
    torch.manual_seed(0)
    model = DeepLabV3Plus(18, 8).eval()
    images = torch.randn(1, 3, 32, 64)
    whole = predict_probabilities(model, images, (32, 64), TestTimeAugmentation())
    covering = predict_probabilities(model, images, (32, 64), TestTimeAugmentation("slide", (32, 64), (32, 64)))
    torch.testing.assert_close(covering, whole)
    windows = predict_probabilities(model, images, (32, 64), TestTimeAugmentation("slide", (32, 32), (32, 16)))
    assert windows.shape == whole.shape and not torch.allclose(windows, whole)
    torch.testing.assert_close(windows.sum(1), torch.ones(1, 32, 64))
    flipped = predict_probabilities(model, images, (32, 64), TestTimeAugmentation(flip=True))
    with torch.no_grad():
        manual = (model(images).softmax(1) + model(images.flip(-1)).flip(-1).softmax(1)) / 2
    torch.testing.assert_close(flipped, manual)
    scaled = predict_probabilities(model, images, (32, 64), TestTimeAugmentation(scales=(0.5, 1.0)))
    with torch.no_grad():
        half = F.interpolate(model(F.interpolate(images, size=(16, 32), mode="bilinear")), size=(32, 64),
                             mode="bilinear").softmax(1)  # fmt: skip
    torch.testing.assert_close(scaled, (half + whole) / 2)


def test_a_file_that_is_not_ours_is_refused(model_and_shards, tmp_path):
    stray = tmp_path / "other.safetensors"
    stray.write_bytes(model_and_shards[0].read_bytes())
    done = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), str(stray)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "no sidecar other.json" in done.stderr
