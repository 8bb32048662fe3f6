import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from seg.core.cityscapes import CLASS_NAMES, ID_TO_TRAINID, VALID_IDS
from seg.core.cli import Size
from seg.data.augment import DeviceAugment
from seg.data.loader import EvalStream, shards_of
from seg.data.manifest import manifest_sha256
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from seg.evaluation.inference import TestTimeAugmentation, _slide, predict_probabilities
from seg.evaluation.metrics import ConfusionMatrix
from seg.model.deeplab import DeepLabV3Plus
from seg.model.weights import export_weights
from seg.recipe.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_and_shards(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    make_synthetic(root / "cityscapes", counts={"train": 4, "val": 5, "test": 2},
                   cities={"train": 2, "val": 2, "test": 1}, size=Size(32, 64), progress=False)  # fmt: skip
    pack(root / "cityscapes", root / "shards", Options(folds=2, splits=("train", "val", "test")), progress=False)
    torch.manual_seed(0)
    model = DeepLabV3Plus(18, 8).eval()
    config = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={root / 'shards'}", "model.output_stride=8"])
    export_weights(model, root / "model.safetensors", {"config": to_dict(config), "metrics": {}})
    return root / "model.safetensors", root / "shards"


def test_evaluate_matches_the_metrics_module_and_an_independent_count_of_the_exported_pngs(model_and_shards, tmp_path):
    model_path, shards = model_and_shards
    done = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), str(model_path), "--out",
                           str(tmp_path / "out"), "--export", str(tmp_path / "png"), "--workers", "0",
                           "--input-size", "full"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["samples"] == result["expected"] == 5
    assert result["settings"] == {"input_size": "full", "input_size_from": "--input-size", "mode": "whole",
                                  "flip": False, "scales": [1.0]}  # fmt: skip
    assert f"mIoU {100 * result['miou']:.2f}% over 5 images" in done.stdout
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


def evaluate_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), *args, "--workers", "0"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_model_configs_eval_size_is_the_default_recorded_and_kept_apart_from_other_settings(model_and_shards):
    model_path, shards = model_and_shards
    done = evaluate_tool(str(model_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "input 192x96, whole, no flip, scales 1; input size from the model's config (data.eval_size)" in done.stdout
    out = model_path.parent / "eval-val-192x96-whole"
    result = json.loads((out / "metrics.json").read_text())
    assert result["settings"] == {"input_size": "192x96", "input_size_from": "the model's config (data.eval_size)",
                                  "mode": "whole", "flip": False, "scales": [1.0]}  # fmt: skip
    assert "tta" not in result  # whole image: no window or stride recorded, as none was used
    assert f"val: mIoU {100 * result['miou']:.2f}% over 5 images -> {out}" in done.stdout
    text = (out / "metrics.md").read_text()
    assert "Settings: input 192x96, whole, no flip, scales 1." in text and f"{100 * result['miou']:.2f}%" in text

    # the same numbers computed here: the image resized to 192x96, the prediction brought back to 64x32
    model = DeepLabV3Plus(18, 8).eval()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(model_path))
    matrix = ConfusionMatrix()
    for item in EvalStream(shards_of(shards, ["val"]), size=(96, 192)):
        with torch.no_grad():
            logits = model(DeviceAugment("none")(item["image"][None], train=False)[0])
        matrix.update(F.interpolate(logits, size=(32, 64), mode="bilinear").argmax(1)[0], item["label"])
    assert result["miou"] == pytest.approx(matrix.compute()["miou"], abs=1e-12)

    # another setting goes beside it, not over it
    done = evaluate_tool(str(model_path), "--input-size", "full", "--flip")
    assert done.returncode == 0, done.stderr[-2000:]
    beside = json.loads((model_path.parent / "eval-val-full-whole-flip" / "metrics.json").read_text())
    assert beside["settings"]["input_size"] == "full" and beside["settings"]["flip"] is True
    assert json.loads((out / "metrics.json").read_text()) == result


def test_the_unlabelled_test_split_exports_predictions_and_reports_no_metrics(model_and_shards, tmp_path):
    model_path, _ = model_and_shards
    refused = evaluate_tool(str(model_path), "--split", "test", "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2 and "the test split has no labels" in refused.stderr
    assert "pass --export DIR" in refused.stderr and not (tmp_path / "refused").exists()

    done = evaluate_tool(str(model_path), "--split", "test", "--export", str(tmp_path / "png"), "--out",
                         str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"test: no labels, no metrics; 2 predictions (labelIds PNGs) -> {tmp_path / 'png'}" in done.stdout
    pngs = sorted((tmp_path / "png").glob("*_labelIds.png"))
    assert len(pngs) == 2
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (64, 32) and image.mode == "L"  # the original size, not the 192x96 input
            assert set(np.unique(np.asarray(image)).tolist()) <= VALID_IDS
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["labelled"] is False and "miou" not in result and result["samples"] == 2
    assert result["settings"]["input_size"] == "192x96" and result["export"] == str(tmp_path / "png")
    assert (
        "No metrics: the `test` split has no labels. 2 predictions exported"
        in (tmp_path / "out" / "metrics.md").read_text()
    )


def test_a_folder_or_a_sidecar_given_as_the_model_says_what_to_pass(model_and_shards, tmp_path):
    model_path, _ = model_and_shards
    fold = tmp_path / "stage1" / "fold0"
    fold.mkdir(parents=True)
    for name in ("best", "model"):
        for suffix in (".safetensors", ".json"):
            (fold / f"{name}{suffix}").write_bytes(model_path.with_suffix(suffix).read_bytes())
    done = evaluate_tool(str(fold))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"{fold}: a folder, not a model file; pass {fold / 'best.safetensors'} (the fold's best weights) or " \
           f"{fold / 'model.safetensors'} (its final weights)" in done.stderr  # fmt: skip
    done = evaluate_tool(str(fold / "best.json"))
    assert done.returncode == 2
    assert f"{fold / 'best.json'}: this is a model's JSON sidecar, not the model; pass {fold / 'best.safetensors'}" \
        in done.stderr  # fmt: skip
    from seg.model.weights import WeightsError, load_model

    with pytest.raises(WeightsError, match=r"a folder, not a model file; pass .*fold0/best\.safetensors"):
        load_model(tmp_path / "stage1")


def test_class_names_in_the_frequency_figure_do_not_overlap():
    import matplotlib.text

    from seg.results.plots import frequency_figure

    # many rare classes of about the same share and IoU: their names used to print over each other
    frequency = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04] + [0.002 + 0.0001 * i for i in range(11)] + [0.0])
    iou = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3] + [0.05 + 0.002 * i for i in range(11)] + [np.nan])
    figure = frequency_figure(iou, frequency / frequency.sum())
    figure.canvas.draw()  # places the annotations
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    texts = [t for t in axes.texts if isinstance(t, matplotlib.text.Annotation)]
    assert sorted(t.get_text() for t in texts) == sorted(CLASS_NAMES[:18])  # the absent one only in the title
    boxes = [matplotlib.text.Text.get_window_extent(t, renderer) for t in texts]
    for i, a in enumerate(boxes):
        assert figure.bbox.contains(a.x0, a.y0) and figure.bbox.contains(a.x1, a.y1), texts[i].get_text()
        for j in range(i):
            assert not a.overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    assert CLASS_NAMES[18] in axes.get_title()


def test_several_model_files_or_an_ensemble_json_evaluate_their_ensemble(model_and_shards, tmp_path):
    model_path, shards = model_and_shards
    models = tmp_path / "models"
    models.mkdir()
    config = json.loads(model_path.with_suffix(".json").read_text())["config"]
    for seed in (1, 2):
        torch.manual_seed(seed)
        export_weights(DeepLabV3Plus(18, 8).eval(), models / f"m{seed}.safetensors", {"config": config, "metrics": {}})
    files = [str(models / "m1.safetensors"), str(models / "m2.safetensors")]
    done = evaluate_tool(*files, "--input-size", "full")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ensemble of 2 models (2 forward passes per view)" in done.stdout
    result = json.loads((models / "eval-val-full-whole-ensemble2" / "metrics.json").read_text())
    assert result["ensemble"] == files and result["samples"] == 5

    # the same numbers by hand: the mean of the two models' probabilities, argmax
    from safetensors.torch import load_file

    nets = []
    for file in files:
        net = DeepLabV3Plus(18, 8).eval()
        net.load_state_dict(load_file(file))
        nets.append(net)
    matrix = ConfusionMatrix()
    for item in EvalStream(shards_of(shards, ["val"])):
        x = DeviceAugment("none")(item["image"][None], train=False)[0]
        with torch.no_grad():
            probabilities = torch.stack([net(x).softmax(1) for net in nets]).mean(0)
        matrix.update(probabilities.argmax(1)[0], item["label"])
    differ = np.abs(np.array(result["confusion"]) - matrix.matrix.numpy()).sum()
    assert differ <= 4  # float rounding may flip a near-tie pixel between the two computations
    assert result["miou"] == pytest.approx(matrix.compute()["miou"], abs=1e-3)

    # an ensemble.json of one member is that model: the very numbers of the file alone
    (models / "ensemble.json").write_text(json.dumps({"format": "seg.ensemble", "members": ["m1.safetensors"]}))
    one = evaluate_tool(str(models / "ensemble.json"), "--input-size", "full", "--out", str(tmp_path / "one"))
    alone = evaluate_tool(files[0], "--input-size", "full", "--out", str(tmp_path / "alone"))
    assert one.returncode == 0 and alone.returncode == 0, one.stderr[-2000:] + alone.stderr[-2000:]
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "alone"))
    assert a["confusion"] == b["confusion"] and a["miou"] == b["miou"] and "ensemble" not in a

    # members of another evaluation size are refused, naming the difference
    other = dict(config, data=dict(config["data"], eval_size=[48, 96]))
    export_weights(DeepLabV3Plus(18, 8).eval(), models / "small.safetensors", {"config": other, "metrics": {}})
    refused = evaluate_tool(files[0], str(models / "small.safetensors"))
    assert refused.returncode == 2 and "differ in data.eval_size: [96, 192] vs [48, 96]" in refused.stderr


# --- sizes the right way round, a window that fits the model, records of what was used ------


def test_a_truncated_ensemble_json_is_named_unreadable_json(model_and_shards, tmp_path):
    """It said "this is a model's JSON sidecar, not the model; pass .../ensemble.safetensors"."""
    from seg.evaluation.ensemble import load_models
    from seg.model.weights import WeightsError

    cut = tmp_path / "ensemble.json"
    cut.write_text(json.dumps({"format": "seg.ensemble", "members": ["a.safetensors", "b.safetensors"]})[:40])
    with pytest.raises(WeightsError, match=rf"^{cut}: not readable JSON \(.*\); an ensemble.json is written whole"):
        load_models([cut])
    sidecar = tmp_path / "model.json"  # a sidecar, even cut short, still names the model to pass
    sidecar.write_text("{")
    (tmp_path / "model.safetensors").write_bytes(model_and_shards[0].read_bytes())
    with pytest.raises(WeightsError, match="this is a model's JSON sidecar, not the model"):
        load_models([sidecar])


def test_an_input_size_the_wrong_way_round_is_refused_naming_the_swap(model_and_shards, tmp_path):
    """96x192 on a 192x96 model used to score badly without a word."""
    model_path, _ = model_and_shards
    done = evaluate_tool(str(model_path), "--input-size", "96x192", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert ("--input-size 96x192 is WIDTHxHEIGHT: 96 wide, 192 high, portrait, but the model's training size "
            "(data.size) is 192x96, landscape; did you mean 192x96?") in done.stderr  # fmt: skip
    assert not (tmp_path / "out").exists()
    done = evaluate_tool(str(model_path), "--mode", "slide", "--crop", "48x96", "--out", str(tmp_path / "out"))
    assert (
        done.returncode == 2 and "--crop 48x96 is WIDTHxHEIGHT" in done.stderr and "did you mean 96x48?" in done.stderr
    )


def test_the_slide_window_is_the_models_training_size_and_the_record_says_what_was_used(model_and_shards):
    """The window used to be 1024x512 (stride 683x341) whatever the model, and the folder said so."""
    model_path, _ = model_and_shards
    done = evaluate_tool(str(model_path), "--mode", "slide")  # (one window on the 192x96 input: a fast test)
    assert done.returncode == 0, done.stderr[-2000:]
    out = model_path.parent / "eval-val-192x96-slide192x96s128x64"
    result = json.loads((out / "metrics.json").read_text())
    assert result["settings"] == {
        "input_size": "192x96", "input_size_from": "the model's config (data.eval_size)", "mode": "slide",
        "flip": False, "scales": [1.0], "crop": "192x96", "stride": "128x64",
        "crop_from": "the training size (data.size of the model's config)",
    }  # fmt: skip
    assert "tta" not in result  # one record, in one notation
    assert "slide (window 192x96, stride 128x64)" in done.stdout


def test_a_window_larger_than_the_input_is_clipped_and_said(model_and_shards, tmp_path):
    model_path, _ = model_and_shards
    done = evaluate_tool(str(model_path), "--mode", "slide", "--crop", "256x128", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("slide window 256x128 is larger than the 192x96 input: clipped to 192x96 "
            "(a single window: the same as --mode whole)") in done.stdout  # fmt: skip
    settings = json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]
    assert (settings["crop"], settings["stride"], settings["crop_from"]) == ("192x96", "128x64",
                                                                            "--crop, clipped to the input")  # fmt: skip


def test_a_window_without_slide_is_refused(model_and_shards, tmp_path):
    model_path, _ = model_and_shards
    done = evaluate_tool(str(model_path), "--crop", "192x96", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "--crop and --stride are the sliding window's: add --mode slide" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_window_is_decided_by_mmsegs_rule():
    tta = TestTimeAugmentation("slide")
    fitted, clipped = tta.fitted((512, 1024), None)
    assert (fitted.crop, fitted.stride, clipped) == ((512, 1024), (341, 683), None)  # mmseg's Cityscapes test_cfg
    fitted, clipped = TestTimeAugmentation("slide", stride=(10, 20)).fitted((96, 192), (64, 256))
    assert (fitted.crop, fitted.stride) == ((64, 192), (10, 20)) and "clipped to 192x64" in clipped


def test_a_stride_longer_than_the_window_is_refused_before_the_data():
    """A stride of 1000x500 over a 64x32 window left most pixels unpredicted (0/0 logits: class 0),
    and the score was silently wrong (6.80% against 28.67%)."""
    with pytest.raises(ValueError, match=r"--stride 1000x500 is longer than the slide window 64x32 \(--crop\)"):
        TestTimeAugmentation("slide", (32, 64), (500, 1000))
    with pytest.raises(ValueError, match="--stride 0x16: each side must be at least 1"):
        TestTimeAugmentation("slide", stride=(16, 0))
    with pytest.raises(ValueError, match=r"longer than the slide window 192x96 \(the model's training size"):
        TestTimeAugmentation("slide", stride=(64, 200)).fitted((96, 192), None)
    # a stride that fits the window but not the window clipped to the input is clipped with it, and said
    fitted, clipped = TestTimeAugmentation("slide", (128, 256), (100, 200)).fitted((96, 192), (64, 128))
    assert (fitted.crop, fitted.stride) == ((64, 128), (64, 128)) and "--stride 200x100 clipped with it" in clipped
    with pytest.raises(ValueError, match="longer than the slide window"):  # the windows themselves, called directly
        _slide(DeepLabV3Plus(18, 8).eval(), torch.randn(1, 3, 64, 64), (32, 32), (48, 48))


def test_a_stride_longer_than_the_window_is_one_line_from_the_tool(model_and_shards, tmp_path):
    model_path, _ = model_and_shards
    given = evaluate_tool(str(model_path), "--mode", "slide", "--crop", "64x32", "--stride", "1000x500",
                          "--input-size", "256x128", "--out", str(tmp_path / "out"))  # fmt: skip
    assert given.returncode == 2 and given.stderr.startswith("error: --stride 1000x500 is longer than the slide window")
    assert given.stderr.count("\n") == 1
    trained = evaluate_tool(str(model_path), "--mode", "slide", "--stride", "200x64", "--out", str(tmp_path / "out"))
    assert trained.returncode == 2 and "error: --stride 200x64 is longer than the slide window 192x96" in trained.stderr
    assert not (tmp_path / "out").exists()


def test_scales_and_workers_that_mean_nothing_are_refused_before_the_model_loads(tmp_path):
    """--scales 0|-1|nan|inf failed with RuntimeError/ValueError/OverflowError after the model and
    the data were loaded, --workers -1 with the DataLoader's ValueError."""
    missing = str(tmp_path / "missing.safetensors")  # refused before it is looked for
    for scale in ("0", "-1", "nan", "inf"):
        done = evaluate_tool(missing, "--scales", "1", scale)
        assert done.returncode == 2 and done.stderr.startswith(f"error: --scales {scale}: each scale must be a finite")
        assert done.stderr.count("\n") == 1
    done = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), missing, "--workers", "-1"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "error: argument --workers: -1: at least 0" in done.stderr
    assert "Traceback" not in done.stderr and "no such file" not in done.stderr


def test_a_relative_recorded_shards_folder_is_found_from_the_run_wherever_the_command_runs(model_and_shards, tmp_path):
    """From another folder, shards/synthetic (the demo's data.shards) was looked for in the working directory."""
    model_path, shards = model_and_shards
    repo = tmp_path / "repo"
    reduced = repo / "runs" / "demo" / "stage1" / "reduced"  # runs/<train.experiment>/..., train.runs_dir "runs"
    reduced.mkdir(parents=True)
    (repo / "data").mkdir()
    (repo / "data" / "packed").symlink_to(shards)
    sidecar = json.loads(model_path.with_suffix(".json").read_text())
    sidecar["config"]["data"]["shards"] = "data/packed"
    assert sidecar["config"]["train"]["experiment"] == "demo"
    (reduced / "model.json").write_text(json.dumps(sidecar))
    (reduced / "model.safetensors").write_bytes(model_path.read_bytes())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = [sys.executable, str(REPO / "tools" / "evaluate.py"), str(reduced / "model.safetensors"), "--workers", "0"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((reduced / "eval-val-192x96-whole" / "metrics.json").read_text())
    assert result["shards"] == str(repo / "data" / "packed") and result["samples"] == 5
    assert result["manifest_sha256"] == manifest_sha256(shards)  # which pack's images, wherever it is

    (repo / "data" / "packed").unlink()  # nowhere to be found: the message says what to pass
    lost = subprocess.run([*run, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          cwd=elsewhere)  # fmt: skip
    assert lost.returncode == 2
    assert "data/packed/manifest.json not found" in lost.stderr and "pass --shards DIR" in lost.stderr


# --- the results folder: whole or not at all ------------------------------------------------


def test_a_full_disk_leaves_no_partial_results_folder_and_an_earlier_one_untouched(model_and_shards, tmp_path,
                                                                                   monkeypatch, capsys):  # fmt: skip
    """It left metrics.json, metrics.md and two of the three figures (exit 74), which the report read as complete."""
    import errno

    import tools.evaluate

    model_path, _ = model_and_shards
    out = tmp_path / "out"
    args = [str(model_path), "--out", str(out), "--workers", "0"]

    def full_after_two(result, matrix, folder, settings):
        (folder / "per_class_iou.png").write_bytes(b"png")
        (folder / "confusion.png").write_bytes(b"png")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "frequency_vs_iou.png"))

    monkeypatch.setattr(tools.evaluate, "evaluation_figures", full_after_two)
    assert tools.evaluate.main(args) == 74
    assert "no space left on the device" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []  # no folder, and no partial one beside it

    monkeypatch.undo()
    assert tools.evaluate.main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(tools.evaluate, "evaluation_figures", full_after_two)
    assert tools.evaluate.main(args) == 74
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier evaluation, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_ctrl_c_is_one_line_and_exit_130(model_and_shards, tmp_path, monkeypatch, capsys):
    """Ctrl-C printed a KeyboardInterrupt traceback."""
    import tools.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tools.evaluate, "evaluate", interrupted)
    assert tools.evaluate.main([str(model_and_shards[0]), "--out", str(tmp_path / "out"), "--workers", "0"]) == 130
    assert capsys.readouterr().err.startswith("interrupted: no results written")
    assert list(tmp_path.iterdir()) == []


def test_a_reused_results_folder_is_replaced_whole_and_a_users_folder_is_refused(model_and_shards, tmp_path):
    """The test split's metrics.md ("No metrics") used to sit beside the val evaluation's figures."""
    model_path, _ = model_and_shards
    out, export = tmp_path / "out", tmp_path / "png"
    assert evaluate_tool(str(model_path), "--out", str(out)).returncode == 0
    assert len(list(out.glob("*.png"))) == 3
    done = evaluate_tool(str(model_path), "--split", "test", "--export", str(export), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md"]
    again = evaluate_tool(str(model_path), "--split", "val", "--export", str(export), "--out", str(out))
    assert again.returncode == 0 and f"note: {export} already holds 2 labelIds PNGs" in again.stdout

    (out / "notes.txt").write_text("mine")  # a folder holding what the tool did not write is not replaced
    refused = evaluate_tool(str(model_path), "--out", str(out))
    assert (
        refused.returncode == 2
        and f"error: {out} holds what an evaluation does not write (notes.txt)" in refused.stderr
    )
    assert (out / "notes.txt").read_text() == "mine"
    inside = evaluate_tool(str(model_path), "--out", str(tmp_path / "e"), "--export", str(tmp_path / "e" / "png"))
    assert inside.returncode == 2 and "is inside the results folder" in inside.stderr


# --- mmseg's habit: CONFIG MODEL ------------------------------------------------------------


def test_a_config_before_the_model_is_checked_against_its_sidecar_and_used(model_and_shards, tmp_path):
    """tools/evaluate.py CONFIG MODEL used to fail with 'not a readable safetensors file ... truncated?'."""
    model_path, shards = model_and_shards
    alone = evaluate_tool(str(REPO / "configs" / "demo.yaml"))
    assert alone.returncode == 2 and "is a config, not a model: pass the model file too" in alone.stderr
    # demo.yaml's network (output stride 16) is not this model's (8): refused, naming the key
    other = evaluate_tool(str(REPO / "configs" / "demo.yaml"), str(model_path), "--shards", str(shards))
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr[-2000:]
    assert "describes another network than the model (model.output_stride 16 there, 8 in the model's sidecar)" \
        in other.stderr  # fmt: skip
    assert "truncated" not in other.stderr
    # the same network, evaluated at the config's size
    config = tmp_path / "same.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text() + "\n")
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.merge(OmegaConf.load(config), {"model": {"output_stride": 8}, "data": {
        "shards": str(shards), "eval_size": [64, 128]}}), config)  # fmt: skip
    done = evaluate_tool(str(config), str(model_path), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"data.eval_size 128x64 from {config} (the model's: 192x96)" in done.stdout
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["config"] == str(config) and result["model"] == str(model_path)
    assert result["settings"]["input_size"] == "128x64"
    assert result["settings"]["input_size_from"] == f"{config} (data.eval_size)"


def test_a_config_of_another_head_or_stem_is_refused_even_against_an_older_sidecar(tmp_path):
    """A sidecar written before model.stem/contract_dilation/head existed builds their defaults:
    a config asking for mmseg's head is another network."""
    from seg.evaluation.evaluate import SettingsError, check_config

    config = tmp_path / "mmseg_like.yaml"
    config.write_text(
        "data: {shards: x, size: [96, 192]}\nmodel: {depth: 18, output_stride: 8, head: separable-aspp}\n"
    )
    older = {"config": {"data": {"shards": "x", "size": [96, 192]},
                        "model": {"depth": 18, "output_stride": 8, "aspp_pool_norm": True}}}  # fmt: skip
    with pytest.raises(SettingsError, match=r"model\.head 'separable-aspp' there, 'aspp' in the model's sidecar"):
        check_config(config, older)
    config.write_text("data: {shards: x, size: [96, 192]}\nmodel: {depth: 18, output_stride: 8}\n")
    assert check_config(config, older)[1] == []  # the same network, the same data: nothing to say
