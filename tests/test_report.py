"""tools/report.py on hand-written run folders, and the reduction's wandb summary run."""

import hashlib
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg.analysis.report import ReportError, load_experiment, write_report
from seg.core.cityscapes import CLASS_NAMES
from seg.results.tracking import log_reduction
from tests.wandb_records import run_record

REPO = Path(__file__).resolve().parents[1]


def iou(seed: float) -> dict[str, float]:
    values = {name: 0.2 + 0.7 * ((seed * (i + 3)) % 1.0) for i, name in enumerate(CLASS_NAMES)}
    values["train"] = math.nan  # a class absent from the fold: NaN, as ConfusionMatrix.compute writes it
    return values


def write_fold(stage_dir: Path, fold: int, evaluations: int, finished: bool = True, torn: bool = False) -> float:
    """A fold's metrics.jsonl (two log records per epoch, an evaluation per epoch), and its
    summary.json when ``finished``; returns its best mIoU."""
    out = stage_dir / f"fold{fold}"
    out.mkdir(parents=True)
    records, steps_per_epoch = [], 10
    for epoch in range(1, evaluations + 1):
        for step in (epoch * steps_per_epoch - 5, epoch * steps_per_epoch):
            records.append(
                {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "train/loss": 3.0 / (1 + step / 7) + 0.01 * fold,
                    "train/lr": 1e-3 * (1 - step / 100),
                    "train/ce": 2.0,
                    "train/dice": 0.5,
                    "train/images_per_s": 12.5,
                }
            )
        miou = 0.3 + 0.04 * epoch - 0.003 * epoch**2 + 0.011 * fold
        step = epoch * steps_per_epoch
        records.append(
            {
                "step": step,
                "epoch": float(epoch),
                "fold/miou": miou,
                "fold/fwiou": miou + 0.2,
                "fold/pixel_accuracy": miou + 0.3,
                "fold/iou": iou(miou),
            }
        )
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    if torn:
        text += '{"epoch": 9.5, "step": 95, "train/lo'  # a fold writing its next line as we read
    (out / "metrics.jsonl").write_text(text)
    evals = [r for r in records if "fold/miou" in r]
    best = max(evals, key=lambda r: r["fold/miou"])
    if finished:
        summary = {
            "fold": fold,
            "stage": 1,
            "steps": evals[-1]["step"],
            "steps_per_epoch": steps_per_epoch,
            "best": {"miou": best["fold/miou"], "step": best["step"]},
            "final": {},
            "stopped_early": False,
            "seconds": 123.4 + fold,
        }
        (out / "summary.json").write_text(json.dumps(summary))
    return best["fold/miou"]


def reduction_report(stage_dir: Path, folds: list[int]) -> dict:
    candidates = [{"name": f"fold{k}", "folds": [k], "recalibrated": False, "miou": 0.40 + 0.01 * k} for k in folds]
    candidates += [
        {"name": "best", "folds": [folds[-1]], "recalibrated": False, "miou": 0.40 + 0.01 * folds[-1]},
        {"name": "mean", "folds": folds, "recalibrated": False, "miou": 0.455},
        {"name": "mean+bn", "folds": folds, "recalibrated": True, "miou": 0.4612},
    ]
    for c in candidates:
        c |= {"fwiou": c["miou"] + 0.2, "pixel_accuracy": c["miou"] + 0.3, "iou": iou(c["miou"])}
    return {
        "stage_dir": str(stage_dir),
        "selection": {"group": "train-selection", "is_official_val": False, "samples": 12},
        "weights": "best",
        "folds": {str(k): {"fold_miou": 0.5, "path": str(stage_dir / f"fold{k}" / "best.safetensors")} for k in folds},
        "candidates": candidates,
        "winner": {"name": "mean+bn", "folds": folds, "miou": 0.4612},
    }


@pytest.fixture
def experiment(tmp_path: Path) -> tuple[Path, dict[str, float]]:
    """Stage 1: folds 0-2 done, fold 3 running (a torn last line), fold 4 with an empty log,
    reduced. Stage 2: two folds done, not reduced. An evaluation of the stage-1 model."""
    root = tmp_path / "runs" / "study"
    best = {}
    for fold in range(3):
        best[f"stage1/fold{fold}"] = write_fold(root / "stage1", fold, 6)
    best["stage1/fold3"] = write_fold(root / "stage1", 3, 2, finished=False, torn=True)
    (root / "stage1" / "fold4").mkdir()
    (root / "stage1" / "fold4" / "metrics.jsonl").write_text("")
    (root / "stage1" / "reduced").mkdir()
    (root / "stage1" / "reduced" / "report.json").write_text(json.dumps(reduction_report(root / "stage1", [0, 1, 2])))
    for fold in range(2):
        best[f"stage2/fold{fold}"] = write_fold(root / "stage2", fold, 4)
    (root / "evaluation").mkdir()
    result = {
        "miou": 0.4321,
        "fwiou": 0.61,
        "pixel_accuracy": 0.8,
        "mean_accuracy": 0.5,
        "iou": iou(0.4321),
        "samples": 5,
        "expected": 5,
        "split": "val",
        "shards": "shards/x",
        "model": str(root / "stage1" / "reduced" / "model.safetensors"),
        "tta": {"mode": "slide", "crop": [512, 1024], "stride": [341, 683], "scales": [0.75, 1.0], "flip": True},
    }
    (root / "evaluation" / "metrics.json").write_text(json.dumps(result))
    return root, best


def test_the_report_renders_offline_with_every_piece_and_notes_what_is_missing(experiment, monkeypatch):
    root, best = experiment
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def no_network(*args, **kwargs):
        raise AssertionError("the report must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    out = write_report(root)
    assert out == root / "report"
    names = {p.name for p in out.iterdir()}
    expected = {
        "report.md",
        "stage1_training.png",
        "stage2_training.png",
        "fold_miou.png",
        "iou_history.png",
        "miou_by_stage.png",
        "reduction.png",
        "final_per_class_iou.png",
    }
    assert names == expected
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            image.verify()

    text = (out / "report.md").read_text()
    for png in names - {"report.md"}:
        assert f"]({png})" in text  # embedded with a relative link
    for fold, miou in best.items():
        assert f"{100 * miou:.2f}" in text, fold
    assert "| 0 | done | " in text and "| 3 | in progress | " in text
    assert "stage1/fold3: still running or stopped (no summary.json)" in text
    assert "stage1/fold3: the last line of metrics.jsonl is incomplete" in text
    assert "stage1/fold4: metrics.jsonl is empty" in text and "| 4 |" not in text
    assert "stage2: not reduced yet" in text
    assert "**mean+bn**" in text and "| mean | 0, 1, 2 | no | 45.50 |" in text
    assert "| `evaluation` |" in text and "| 43.21 |" in text and "| slide | yes | 0.75, 1 |" in text
    # the final model's per-class table: the evaluation and the last reduction's winner
    assert "| class | evaluation (val) | stage 1 winner mean+bn (selection) |" in text
    assert f"| road | {100 * iou(0.4321)['road']:.2f} | {100 * iou(0.4612)['road']:.2f} |" in text
    assert "| train | n/a | n/a |" in text
    assert [len(s.folds) for s in load_experiment(root).stages] == [4, 2]


def running_fold(root: Path) -> Path:
    """An experiment whose only fold has logged twice and not evaluated yet."""
    (root / "stage1" / "fold0").mkdir(parents=True)
    records = [{"step": s, "epoch": s / 10, "train/loss": 2.0 - s / 10, "train/lr": 1e-3} for s in (5, 10)]
    (root / "stage1" / "fold0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_the_command_line_and_its_errors(tmp_path):
    root = running_fold(tmp_path / "fresh")
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "report.py"), str(root), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "r" / "report.md").is_file() and not (root / "report").exists()

    from tools.report import main

    assert main([str(tmp_path)]) == 2  # not an experiment folder
    assert main([str(root / "stage1")]) == 2

    # a second run replaces the report as a whole
    (tmp_path / "r" / "stale.png").write_bytes(b"old")
    assert main([str(root), "--out", str(tmp_path / "r")]) == 0
    assert not (tmp_path / "r" / "stale.png").exists() and (tmp_path / "r" / "report.md").is_file()
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert main([str(root), "--out", str(tmp_path / "precious")]) == 2  # not replaced: not a report folder
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_errors_name_the_file_and_the_line(experiment, capsys):
    root, _ = experiment
    with pytest.raises(ReportError, match=r"not an experiment folder \(no stage\*/fold\*/metrics.jsonl\)"):
        write_report(root / "evaluation")

    log = root / "stage2" / "fold1" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    lines[2] = lines[2][:40]  # a damaged line in the middle, not one being written
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=rf"{log}:3: not a JSON record"):
        write_report(root)
    assert not (root / "report").exists()  # nothing half-written

    from tools.report import main

    assert main([str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{log}:3:" in err

    log.write_text('{"step": 5, "epoch": 0.5, "train/loss": 1.0}\n[1, 2]\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl:2: not a metrics record"):
        write_report(root)


def test_a_stage_with_nothing_but_running_folds_is_reported(tmp_path):
    root = running_fold(tmp_path / "fresh")
    out = write_report(root, tmp_path / "out")
    text = (out / "report.md").read_text()
    assert "stage1/fold0: no evaluation yet" in text and "No evaluation result" in text
    assert "No per-class IoU yet" in text
    assert {p.name for p in out.iterdir()} == {"report.md", "stage1_training.png"}


def test_log_reduction_writes_an_offline_run_in_the_experiment_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    stage = tmp_path / "runs" / "study" / "stage2"
    report = reduction_report(stage, [0, 1, 2])
    plot = tmp_path / "reduction.png"
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(plot)
    config = {"train": {"experiment": "study"}, "wandb": {"project": "seg", "entity": None, "mode": "disabled"}}

    log_reduction(config, 2, report, tmp_path / "disabled", plot)
    assert not (tmp_path / "disabled").exists()

    config["wandb"]["mode"] = "offline"
    out = stage / "reduced"
    out.mkdir(parents=True)
    log_reduction(config, 2, report, out, plot)
    import wandb

    wandb.teardown()  # the service may still be writing the run's file when finish() returns
    (record_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    run = run_record(record_file)
    assert (run.run_group, run.job_type, run.display_name, run.run_id) == (
        "study",
        "stage2-reduce",
        "study-s2-reduce",
        "study-s2-reduce",
    )
    data = record_file.read_bytes()
    assert b"reduction/candidates" in data and b"mean+bn" in data


def test_reduction_table_says_which_candidates_are_the_same_model_and_counts_images_in_words(tmp_path):
    from seg.results.tables import reduction_lines

    report = reduction_report(tmp_path / "stage1", [0, 1, 2])
    top3 = {
        "name": "top3",
        "folds": [2, 0, 1],
        "recalibrated": False,
        "miou": 0.455,
        "fwiou": 0.6,
        "pixel_accuracy": 0.7,
    }
    report["candidates"].insert(5, top3)  # after mean, as seg/reduction/reduce.py orders them
    report["selection"]["samples"] = 1
    text = "\n".join(reduction_lines(report))
    assert "(1 image)" in text and "1 images" not in text
    assert "| top3 (the same model as mean) | 2, 0, 1 | no | 45.50 |" in text
    assert "| best (the same model as fold2) | 2 |" in text
    assert "| **mean+bn** | 0, 1, 2 | yes |" in text  # recalibrated: another model than mean


def test_reduction_figures_start_at_zero_and_mark_the_winner(tmp_path):
    from seg.results.plots import plot_reductions, reduction_figure
    from seg.results.records import StageRecord

    report = reduction_report(tmp_path / "stage1", [0, 1, 2])
    figure = plot_reductions([StageRecord(1, tmp_path / "stage1", reduction=report)])
    assert figure.axes[0].get_ylim()[0] == 0
    reduction_figure(1, tmp_path / "stage1", report, tmp_path / "reduction.png")
    pixels = np.asarray(Image.open(tmp_path / "reduction.png").convert("RGB")).reshape(-1, 3)
    winner_colour = (pixels == (0xD9, 0x82, 0x2B)).all(1)
    assert winner_colour.sum() > 100  # the winner's bar, in its own colour


def test_the_evaluation_table_shows_the_input_size_and_an_unlabelled_export_is_noted(experiment):
    root, _ = experiment
    result = json.loads((root / "evaluation" / "metrics.json").read_text())
    result["settings"] = {"input_size": "1024x512", "input_size_from": "--input-size", "mode": "slide",
                          "flip": True, "scales": [0.75, 1.0]}  # fmt: skip
    (root / "evaluation" / "metrics.json").write_text(json.dumps(result))
    test = root / "stage1" / "reduced" / "eval-test-1024x512-whole"
    test.mkdir(parents=True)
    unlabelled = {"split": "test", "labelled": False, "samples": 6, "export": "pred/", "settings": result["settings"]}
    test.joinpath("metrics.json").write_text(json.dumps(unlabelled))
    text = (write_report(root) / "report.md").read_text()
    assert "| input size | mode |" in text and "| 1024x512 | slide | yes | 0.75, 1 | 43.21 |" in text
    assert "stage1/reduced/eval-test-1024x512-whole: test split, no labels: 6 predictions exported to pred/" in text


def test_the_pooled_out_of_fold_score_equals_one_evaluation_of_every_held_out_image(tmp_path):
    """Three folds of 1, 2 and 4 images, each evaluated by its own model through seg.evaluation.evaluate
    (as train.py's final evaluation does), written to summary.json: the pooled score equals
    one confusion matrix over every image predicted by hand, and the sum of the folds' matrices."""
    import torch

    from seg.data.augment import DeviceAugment
    from seg.evaluation.evaluate import evaluate
    from seg.evaluation.metrics import ConfusionMatrix
    from seg.evaluation.out_of_fold import stage_out_of_fold
    from seg.model.deeplab import DeepLabV3Plus
    from seg.results.tables import out_of_fold_lines, reduction_lines

    generator = torch.Generator().manual_seed(0)
    normalise = DeviceAugment("none")
    stage = tmp_path / "runs" / "x" / "stage1"
    by_hand = ConfusionMatrix()
    matrices = []
    for fold, images in enumerate((1, 2, 4)):
        torch.manual_seed(fold)
        model = DeepLabV3Plus(18, 8).eval()
        batches = [
            {
                "image": torch.randint(0, 256, (1, 3, 32, 48), generator=generator, dtype=torch.uint8),
                "label": torch.randint(0, 19, (1, 32, 48), generator=generator).where(
                    torch.rand(1, 32, 48, generator=generator) > 0.1, torch.tensor(255)
                ),
                "key": [f"f{fold}i{i}"],
            }
            for i in range(images)
        ]
        matrix, seen, _ = evaluate(model, batches, torch.device("cpu"), normalise)
        result = matrix.compute() | {"samples": seen, "skipped": 0}
        (stage / f"fold{fold}").mkdir(parents=True)
        (stage / f"fold{fold}" / "summary.json").write_text(json.dumps({"final": {"fold": result}}))
        matrices.append(matrix.matrix)
        with torch.no_grad():
            for batch in batches:
                by_hand.update(model(normalise(batch["image"], train=False)[0]).argmax(1), batch["label"])
    oof = stage_out_of_fold(stage, [0, 1, 2])
    assert oof["pooled"] == by_hand.compute()
    assert oof["pooled"]["confusion"] == sum(matrices).tolist()
    assert oof["samples"] == 7 and oof["missing"] == [] and oof["unavailable"] is None
    summaries = [json.loads((stage / f"fold{k}" / "summary.json").read_text()) for k in range(3)]
    per_fold = [s["final"]["fold"]["miou"] for s in summaries]
    assert oof["mean"]["miou"] == pytest.approx(np.mean(per_fold))
    assert oof["std"]["miou"] == pytest.approx(np.std(per_fold, ddof=1))
    text = "\n".join(out_of_fold_lines(oof))
    assert f"| **pooled** | 0, 1, 2 | 7 | {100 * by_hand.compute()['miou']:.2f} |" in text
    assert f"| mean ± std (range) of the folds | 0, 1, 2 | 7 | {100 * np.mean(per_fold):.2f} ± " in text
    report = reduction_report(stage, [0, 1, 2]) | {"out_of_fold": oof}
    assert text in "\n".join(reduction_lines(report))

    # a fold trained before summaries carried the matrix: the pooled score is unavailable, naming it
    summary = json.loads((stage / "fold1" / "summary.json").read_text())
    del summary["final"]["fold"]["confusion"]
    (stage / "fold1" / "summary.json").write_text(json.dumps(summary))
    oof = stage_out_of_fold(stage, [0, 1, 2])
    assert oof["pooled"] is None and oof["missing"] == [1]
    assert oof["mean"]["miou"] == pytest.approx(np.mean(per_fold))  # the per-fold numbers still stand
    assert "| pooled: unavailable (fold 1 has no confusion matrix in its final result" in "\n".join(
        out_of_fold_lines(oof)
    )


def test_the_experiment_report_shows_the_out_of_fold_estimates_and_names_folds_without_a_matrix(experiment):
    root, _ = experiment
    confusion = np.zeros((19, 19), dtype=int)
    confusion[0, 0], confusion[1, 1], confusion[1, 0] = 80, 15, 5
    for fold in (0, 1):
        path = root / "stage2" / f"fold{fold}" / "summary.json"
        summary = json.loads(path.read_text())
        summary["final"] = {"fold": {"miou": 0.4 + 0.1 * fold, "fwiou": 0.6, "confusion": confusion.tolist(),
                                     "samples": 3}}  # fmt: skip
        path.write_text(json.dumps(summary))
    text = (write_report(root) / "report.md").read_text()
    # stage 1's summaries predate the matrix (final: {}): unavailable, naming the folds
    assert "| unavailable (fold 0, 1, 2) |" in text
    # stage 2: both folds carry it; pooled over 200 pixels: road 80/85, sidewalk 15/20
    assert f"| {100 * (80 / 85 + 15 / 20) / 2:.2f} | 45.00 ± 7.07 |" in text
    assert "| **pooled** | 0, 1 | 6 |" in text


# --- figures that always draw --------------------------------------------------------------


def test_a_one_epoch_fold_draws_its_single_loss_record(tmp_path):
    """stage1_training.png was blank for 1-epoch folds: one record each, drawn as a line with no marker."""
    from seg.results.plots import fold_colour, plot_training, save
    from seg.results.records import FoldRecord, StageRecord

    log = [{"epoch": 1.0, "step": 5, "train/loss": 1.0, "train/lr": 1e-3}]
    folds = [FoldRecord(1, k, tmp_path, [r | {"train/loss": 1.0 + k} for r in log], None) for k in range(2)]
    figure = plot_training(StageRecord(1, tmp_path, folds))
    for axes in figure.axes[:2]:
        assert all(line.get_marker() not in (None, "", "None") for line in axes.get_lines())
    save(figure, tmp_path / "training.png")
    pixels = np.asarray(Image.open(tmp_path / "training.png").convert("RGB")).reshape(-1, 3).astype(int)
    for k in range(2):
        colour = np.round(np.array(fold_colour(k)[:3]) * 255).astype(int)
        assert (np.abs(pixels - colour).max(1) <= 2).sum() > 20, f"fold {k}'s point is not drawn"


def test_the_confusion_matrix_says_how_it_is_normalised():
    from seg.results.plots import confusion_figure

    figure = confusion_figure(np.eye(19) * 10 + 1)
    image_axes, colorbar = figure.axes
    assert "normalised per true class" in image_axes.get_title()
    assert "row-normalised" in colorbar.get_ylabel()


def test_a_prediction_overlay_can_carry_a_legend_of_the_classes_it_shows():
    from seg.core.cityscapes import PALETTE, colorize
    from seg.results.plots import overlay_with_legend

    prediction = np.zeros((64, 128), np.uint8)
    prediction[:, 64:] = 13  # car
    prediction[:10, :10] = 11  # person
    overlay = colorize(prediction)
    drawn = overlay_with_legend(overlay, prediction)
    assert drawn.shape[0] == 64 and drawn.shape[1] > 128
    np.testing.assert_array_equal(drawn[:, :128], overlay)  # the overlay's own pixels, untouched
    legend = drawn[:, 128:].reshape(-1, 3)
    for train_id in (0, 13, 11):  # each class shown has its swatch; a class not shown has none
        assert (legend == PALETTE[train_id]).all(1).sum() > 20
    assert not (legend == PALETTE[5]).all(1).any()


def test_the_reduction_says_which_shards_chose_it_and_flags_another_pack_than_the_folds(experiment):
    root, _ = experiment
    path = root / "stage1" / "reduced" / "report.json"
    report = json.loads(path.read_text())
    for summary_path in root.glob("stage1/fold*/summary.json"):
        summary = json.loads(summary_path.read_text())
        summary["identity"] = {"data": {"manifest_sha256": "ab" * 32}}
        summary_path.write_text(json.dumps(summary))
    path.write_text(json.dumps(report | {"shards": {"path": "/w/sh", "manifest_sha256": "ab" * 32}}))
    text = (write_report(root) / "report.md").read_text()
    assert f"Chosen on the shards `/w/sh` (manifest sha256 `{'ab' * 32}`).\n" in text
    path.write_text(json.dumps(report | {"shards": {"path": "/w/sh", "manifest_sha256": "cd" * 32}}))
    text = (write_report(root) / "report.md").read_text()
    assert f"(manifest sha256 `{'cd' * 32}`). **Not the pack the folds trained on** (sha256 `{'ab' * 32}`)" in text
    path.write_text(json.dumps(report | {"options": {"shards": "/w/old"}}))  # a reduction before the sha was recorded
    assert (
        "Chosen on the shards `/w/old` (manifest sha256 not recorded)."
        in (write_report(root) / "report.md").read_text()
    )


def test_the_report_says_what_the_next_stage_started_from_by_the_recorded_sha(experiment):
    """Stage 1 reduced again after stage 2 trained: the report said stage 2 starts from today's reduced model."""
    root, _ = experiment
    reduced = root / "stage1" / "reduced"
    report = json.loads((reduced / "report.json").read_text())
    seed = {"name": "best", "folds": [2], "miou": 0.42, "why": "The selection winner.", "seed_from": "best-single"}
    (reduced / "report.json").write_text(json.dumps(report | {"seed": seed}))
    (reduced / "model.safetensors").write_bytes(b"the model of today's reduction")
    today = "sha256:" + hashlib.sha256(b"the model of today's reduction").hexdigest()
    earlier = "sha256:" + hashlib.sha256(b"the greedy+bn model it replaced").hexdigest()

    def stage2_started_from(model: str) -> None:
        for summary_path in root.glob("stage2/fold*/summary.json"):
            summary = json.loads(summary_path.read_text())
            summary["identity"] = {"init_from": {"path": str(reduced / "model.safetensors"), "model": model}}
            summary_path.write_text(json.dumps(summary))

    stage2_started_from(earlier)
    text = (write_report(root) / "report.md").read_text()
    assert "the model the next stage starts from" not in text
    assert (f"`reduced/model.safetensors` is now **best** (folds 2), mIoU 42.00, {today[:19]}; The selection "
            f"winner. **stage2 did not start from it**: its folds 0, 1 started from {earlier[:19]} (their "
            "identities") in text  # fmt: skip
    stage2_started_from(today)
    text = (write_report(root) / "report.md").read_text()
    assert "`reduced/model.safetensors`, the model the next stage starts from: **best**" in text
    assert f"stage2's folds 0, 1 started from it ({today[:19]}, as their identities record)." in text


def test_the_evaluation_table_shows_the_shards_and_flags_rows_on_different_ones(experiment):
    root, _ = experiment
    other = root / "stage1" / "reduced" / "eval-val-1024x512-whole"
    other.mkdir(parents=True)
    result = json.loads((root / "evaluation" / "metrics.json").read_text())
    other.joinpath("metrics.json").write_text(json.dumps(result | {"shards": "/w/sh", "manifest_sha256": "0e3a" * 16}))
    text = (write_report(root) / "report.md").read_text()
    assert "| val | 5 | `shards/x` | not recorded |" in text and "| val | 5 | `/w/sh` (0e3a0e3a0e3a) |" in text
    assert "**The rows are on 2 different shards** (`/w/sh` (0e3a0e3a0e3a), `shards/x`)" in text
    other.joinpath("metrics.json").unlink()
    assert "different shards" not in (write_report(root) / "report.md").read_text()
