"""tools/predict.py: the three PNGs per image, what they hold, and clean refusals."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from seg.core.cityscapes import PALETTE, TRAINID_TO_ID, VALID_IDS
from seg.data.augment import IMAGENET_MEAN, IMAGENET_STD
from seg.model.deeplab import DeepLabV3Plus
from seg.model.weights import export_weights
from seg.recipe.config import load_config, to_dict
from tools.predict import main

REPO = Path(__file__).resolve().parents[1]


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour bands with noise: enough structure for a random model to vary its classes."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) % 64 * 4], axis=-1)
    return np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = DeepLabV3Plus(18, 8).eval()
    # the model section pinned here: the demo config's may change
    config = load_config(
        REPO / "configs" / "demo.yaml",
        ["data.shards=unused", "model.depth=18", "model.output_stride=8", "model.aspp_pool_norm=true"],
    )
    export_weights(model, root / "model.safetensors", {"config": to_dict(config), "metrics": {}})
    images = root / "images"
    (images / "aachen").mkdir(parents=True)
    (images / "more" / "deeper").mkdir(parents=True)
    Image.fromarray(scene(64, 128, 0)).save(images / "aachen" / "aachen_000000_000019_leftImg8bit.png")
    Image.fromarray(scene(48, 80, 1)).save(images / "more" / "deeper" / "street.jpg", quality=95)
    (images / "notes.txt").write_text("not an image, and not picked up")
    single = root / "single.png"
    Image.fromarray(scene(40, 72, 2)).save(single)
    return root / "model.safetensors", images, single


def expected_train_ids(model_path: Path, image_path: Path) -> np.ndarray:
    """The argmax of the model's output on the normalised image, computed here directly."""
    model = DeepLabV3Plus(18, 8).eval()
    model.load_state_dict(load_file(model_path))
    pixels = torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))).permute(2, 0, 1).float() / 255
    x = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        return model(x[None]).argmax(1)[0].numpy().astype(np.uint8)


def test_each_image_gives_colour_overlay_and_label_ids_pngs(model_and_images, tmp_path, capsys):
    model_path, images, single = model_and_images
    out = tmp_path / "out"
    argv = [str(model_path), str(images), str(single), "--out", str(out), "--alpha", "0.4", "--size", "full"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "input full resolution, whole, no flip, scales 1; input size from --size\n" in printed
    assert "3 images ->" in printed
    cases = {
        images / "aachen" / "aachen_000000_000019_leftImg8bit.png": out / "aachen" / "aachen_000000_000019",
        images / "more" / "deeper" / "street.jpg": out / "more" / "deeper" / "street",
        single: out / "single",
    }
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(
        f"{s.relative_to(out).as_posix()}_{k}.png" for s in cases.values() for k in ("color", "overlay", "labelIds")
    )
    palette = {tuple(c) for c in PALETTE.tolist()}
    classes = set()
    for image_path, stem in cases.items():
        image = np.asarray(Image.open(image_path).convert("RGB"))
        colour = Image.open(f"{stem}_color.png")
        overlay = Image.open(f"{stem}_overlay.png")
        label_ids = Image.open(f"{stem}_labelIds.png")
        assert colour.mode == overlay.mode == "RGB" and label_ids.mode == "L"
        assert colour.size == overlay.size == label_ids.size == (image.shape[1], image.shape[0])
        colour = np.asarray(colour)
        assert {tuple(c) for c in colour.reshape(-1, 3).tolist()} <= palette
        train_ids = expected_train_ids(model_path, image_path)
        np.testing.assert_array_equal(np.asarray(label_ids), TRAINID_TO_ID[train_ids])
        np.testing.assert_array_equal(colour, PALETTE[train_ids])
        blend = np.clip((0.6 * image.astype(np.float32) + 0.4 * colour.astype(np.float32)).round(), 0, 255)
        np.testing.assert_array_equal(np.asarray(overlay), blend.astype(np.uint8))
        classes |= set(np.unique(train_ids).tolist())
    assert len(classes) > 1  # the comparison above is not one of constant maps


def test_sliding_windows_flips_scales_and_a_resized_input_keep_the_image_size(model_and_images, tmp_path, capsys):
    model_path, images, _ = model_and_images
    out = tmp_path / "out"
    argv = [
        str(model_path),
        str(images / "aachen"),
        "--out",
        str(out),
        "--mode",
        "slide",
        "--crop",
        "64x32",
        "--stride",
        "32x16",
        "--flip",
        "--scales",
        "0.5",
        "1.0",
        "--size",
        "96x48",
    ]
    assert main(argv) == 0
    label_ids = Image.open(out / "aachen_000000_000019_labelIds.png")
    assert label_ids.size == (128, 64)
    assert set(np.unique(np.asarray(label_ids)).tolist()) <= VALID_IDS
    assert "1 image ->" in capsys.readouterr().out


def test_the_input_defaults_to_the_model_configs_eval_size_and_says_so(model_and_images, tmp_path, capsys):
    model_path, _, single = model_and_images
    assert main([str(model_path), str(single), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "input 192x96, whole, no flip, scales 1; input size from the model's config (data.eval_size)" in printed
    assert "1 image ->" in printed
    # computed here: the image resized to 192x96 (Pillow, bilinear), the logits brought back to 72x40
    model = DeepLabV3Plus(18, 8).eval()
    model.load_state_dict(load_file(model_path))
    image = Image.open(single).convert("RGB").resize((192, 96), Image.BILINEAR)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    x = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        logits = F.interpolate(model(x[None]), size=(40, 72), mode="bilinear", align_corners=False)
    expected = TRAINID_TO_ID[logits.argmax(1)[0].numpy().astype(np.uint8)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "single_labelIds.png")), expected)


def test_a_folder_or_a_sidecar_given_as_the_model_names_the_file_to_pass(model_and_images, tmp_path, capsys):
    model_path, _, single = model_and_images
    reduced = tmp_path / "stage2" / "reduced"
    reduced.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        (reduced / f"model{suffix}").write_bytes(model_path.with_suffix(suffix).read_bytes())
    assert main([str(reduced), str(single), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{reduced}: a folder, not a model file; pass {reduced / 'model.safetensors'} (the model)\n" in err
    assert main([str(reduced.parent), str(single), "--out", str(tmp_path / "out")]) == 2
    assert f"pass one of {reduced / 'model.safetensors'}" in capsys.readouterr().err
    (reduced / "model.safetensors").unlink()
    assert main([str(reduced / "model.json"), str(single), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{reduced / 'model.json'}: this is a model's JSON sidecar, not the model; pass " in err
    assert "(it is not there: copy it along with model.json)" in err
    assert listing(tmp_path / "out") == []


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def test_a_model_file_that_is_not_ours_or_is_truncated_is_refused_leaving_no_output(model_and_images, tmp_path, capsys):
    model_path, images, _ = model_and_images
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(model_path), str(foreign))  # the same tensors, without our format metadata
    (tmp_path / "foreign.json").write_bytes(model_path.with_suffix(".json").read_bytes())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    (tmp_path / "truncated.json").write_bytes(model_path.with_suffix(".json").read_bytes())
    for path, message in (
        (foreign, "not a seg model file (format None, expected 'seg.deeplabv3plus')"),
        (truncated, "not a readable safetensors file"),
        (tmp_path / "missing.safetensors", "no such file"),
    ):
        out = tmp_path / f"out-{path.stem}"
        assert main([str(path), str(images), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path}: {message}" in err
        assert listing(out) == []


def test_unreadable_images_and_empty_inputs_are_refused_with_no_partial_file(model_and_images, tmp_path, capsys):
    model_path, _, single = model_and_images
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(single.read_bytes())
    (broken / "b.png").write_bytes(b"this is not a PNG")
    out = tmp_path / "out"
    assert main([str(model_path), str(broken), "--out", str(out)]) == 2
    assert f"{broken / 'b.png'}: cannot read the image" in capsys.readouterr().err
    assert listing(out) == []  # refused before anything was written

    # a PNG cut short is found only on decoding: the image before it is complete, nothing else is there
    (broken / "b.png").write_bytes(single.read_bytes()[:300])
    assert main([str(model_path), str(broken), "--out", str(out)]) == 2
    assert f"{broken / 'b.png'}: cannot read the image" in capsys.readouterr().err
    assert listing(out) == ["a_color.png", "a_labelIds.png", "a_overlay.png"]

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    assert main([str(model_path), str(tmp_path / "empty"), "--out", str(tmp_path / "out2")]) == 2
    assert "empty: no images (*.png, *.jpg, *.jpeg) in this folder" in capsys.readouterr().err
    assert main([str(model_path), str(tmp_path / "nowhere"), "--out", str(tmp_path / "out2")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err

    (broken / "b.png").unlink()
    (broken / "a.jpg").write_bytes(b"x")
    assert main([str(model_path), str(broken), "--out", str(tmp_path / "out2")]) == 2
    assert "would both write" in capsys.readouterr().err
    assert listing(tmp_path / "out2") == []


def test_an_output_folder_inside_the_input_is_not_read_back(model_and_images, tmp_path, capsys):
    model_path, _, single = model_and_images
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "p.png").write_bytes(single.read_bytes())
    for _ in range(2):  # the second run must not predict the first run's PNGs
        assert main([str(model_path), str(folder), "--out", str(folder / "pred")]) == 0
        assert "1 image ->" in capsys.readouterr().out
    assert listing(folder / "pred") == ["p_color.png", "p_labelIds.png", "p_overlay.png"]


def test_several_model_files_predict_as_their_ensemble(model_and_images, tmp_path):
    """The same model twice: the ensemble's prediction is the model's."""
    model_path, _, single = model_and_images
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(model_path.read_bytes())
    copy.with_suffix(".json").write_bytes(model_path.with_suffix(".json").read_bytes())
    assert main([str(model_path), str(copy), str(single), "--out", str(tmp_path / "two"), "--size", "full"]) == 0
    assert main([str(model_path), str(single), "--out", str(tmp_path / "one"), "--size", "full"]) == 0
    two = np.asarray(Image.open(tmp_path / "two" / "single_labelIds.png"))
    one = np.asarray(Image.open(tmp_path / "one" / "single_labelIds.png"))
    assert (two == one).mean() > 0.999  # equal up to a float near-tie
    with pytest.raises(SystemExit):
        main([str(model_path), str(copy), "--out", str(tmp_path / "none")])  # models, but no image


def test_a_size_the_wrong_way_round_is_refused_and_a_config_first_is_accepted(model_and_images, tmp_path, capsys):
    model_path, _, single = model_and_images
    assert main([str(model_path), str(single), "--out", str(tmp_path / "out"), "--size", "96x192"]) == 2
    err = capsys.readouterr().err
    assert "--size 96x192 is WIDTHxHEIGHT: 96 wide, 192 high, portrait" in err and "did you mean 192x96?" in err
    assert not (tmp_path / "out").exists()
    # mmseg's habit: the config first; the model's own network, so accepted
    config = tmp_path / "same.yaml"
    from omegaconf import OmegaConf

    sidecar = OmegaConf.load(model_path.with_suffix(".json"))
    OmegaConf.save(sidecar.config, config)
    assert main([str(config), str(model_path), str(single), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "single_labelIds.png").is_file()
    assert f"input size from {config} (data.eval_size)" in capsys.readouterr().out


def test_legend_gives_each_overlay_a_legend_beside_it(model_and_images, tmp_path):
    model_path, _, single = model_and_images
    assert main([str(model_path), str(single), "--out", str(tmp_path / "out"), "--legend"]) == 0
    with Image.open(tmp_path / "out" / "single_overlay.png") as overlay:
        assert overlay.height >= 40 and overlay.width > 72  # the 72x40 image and its legend to the right
    with Image.open(tmp_path / "out" / "single_labelIds.png") as label_ids:
        assert label_ids.size == (72, 40)  # the other outputs keep the image's size


def test_scales_that_mean_nothing_are_refused_before_the_model_loads(tmp_path, capsys):
    """--scales 0|nan failed after the model was loaded and the first image read."""
    model, out = str(tmp_path / "missing.safetensors"), str(tmp_path / "out")
    for scale in ("0", "nan"):
        with pytest.raises(SystemExit) as refused:
            main([model, str(tmp_path), "--out", out, "--scales", scale])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --scales {scale}: each scale must be a finite factor above 0")
        assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_full_disk_leaves_each_images_outputs_whole_or_none(model_and_images, tmp_path, monkeypatch, capsys):
    """A failed write left an image's _color.png without its overlay or labelIds."""
    import errno

    import seg.core.atomic

    model_path, _, single = model_and_images
    out = tmp_path / "out"
    argv = [str(model_path), str(single), "--out", str(out)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    staged = seg.core.atomic._write_temporary

    def full_at_label_ids(path, data):
        if path.name.endswith("_labelIds.png"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return staged(path, data)

    monkeypatch.setattr(seg.core.atomic, "_write_temporary", full_at_label_ids)
    assert main([*argv, "--alpha", "0.9"]) == 74
    assert "no space left on the device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier set, whole; no temporary file
    assert main([str(model_path), str(single), "--out", str(tmp_path / "new")]) == 74
    assert listing(tmp_path / "new") == []


def test_ctrl_c_is_one_line_and_exit_130_with_the_images_before_it_complete(model_and_images, tmp_path, monkeypatch,
                                                                           capsys):  # fmt: skip
    """Ctrl-C printed a KeyboardInterrupt traceback."""
    import seg.evaluation.predict

    model_path, images, _ = model_and_images
    predicted = seg.evaluation.predict.predict_image
    calls = []

    def interrupted_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return predicted(*args, **kwargs)

    monkeypatch.setattr(seg.evaluation.predict, "predict_image", interrupted_at_the_second)
    out = tmp_path / "out"
    assert main([str(model_path), str(images), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err == f"interrupted: the images predicted before are complete in {out}, none in part; exit 130\n"
    assert listing(out) == [
        "aachen",
        *(f"aachen/aachen_000000_000019_{k}.png" for k in ("color", "labelIds", "overlay")),
    ]


def test_a_photo_stored_sideways_is_predicted_as_it_displays(model_and_images, tmp_path):
    """A JPEG stored 64x128 with EXIF Orientation=6 (displays 128x64) was predicted and written unrotated."""
    model_path, _, _ = model_and_images
    shown = scene(64, 128, 3)  # how the photo displays: 128 wide, 64 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to display
    photo = tmp_path / "photo.jpg"
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(photo, quality=100, exif=exif)
    assert Image.open(photo).size == (64, 128)
    upright = tmp_path / "upright.png"  # the photo's own pixels, turned as it displays
    ImageOps.exif_transpose(Image.open(photo)).save(upright)
    assert main([str(model_path), str(photo), "--out", str(tmp_path / "out"), "--size", "full"]) == 0
    label_ids = Image.open(tmp_path / "out" / "photo_labelIds.png")
    assert label_ids.size == Image.open(tmp_path / "out" / "photo_overlay.png").size == (128, 64)
    np.testing.assert_array_equal(np.asarray(label_ids), TRAINID_TO_ID[expected_train_ids(model_path, upright)])
