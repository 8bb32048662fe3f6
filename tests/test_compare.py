"""tools/compare.py on fold folders written as seg/train.py writes them (tests/fold_folders.py):
its numbers against scipy.stats, every refusal, unfinished folds, bad files, the CLI and wandb."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import stats

from seg.analysis.compare import CompareError, NotComparableError, compare
from tests.fold_folders import manifest, write_fold, write_reduction, write_shards
from tests.wandb_records import run_record

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
BASE = [0.412, 0.398, 0.455, 0.391, 0.420]
VARIANT = [0.431, 0.405, 0.468, 0.387, 0.441]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two finished 5-fold experiments on the same shards; A also reduced and evaluated."""
    runs = tmp_path / "runs"
    shards = write_shards(tmp_path / "shards" / "cityscapes", manifest())
    for k in range(5):
        write_fold(runs, "A", k, BASE[k], BASE[k] + 0.01 * (k % 2), shards)
        write_fold(runs, "B", k, VARIANT[k], VARIANT[k] - 0.005, shards)
    write_reduction(runs, "A", list(range(5)), 0.47, shards)
    return runs / "A", runs / "B"


# --- the comparison -----------------------------------------------------------------------------


def test_the_comparison_pairs_folds_and_its_numbers_equal_scipys(pair):
    a, b = pair
    result = compare([a, b])
    assert result["stage"] == 1 and result["baseline"] == "A" and result["use"] == "final"
    (p,) = result["pairs"]
    assert p["folds"] == [0, 1, 2, 3, 4] and p["differences"] == pytest.approx(np.subtract(VARIANT, BASE))
    ttest = stats.ttest_rel(VARIANT, BASE)
    assert (p["t"], p["t_p"]) == pytest.approx((ttest.statistic, ttest.pvalue), rel=1e-10)
    d = np.subtract(VARIANT, BASE)
    assert p["difference"]["ci"] == pytest.approx(
        stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d)), rel=1e-10
    )
    assert p["wilcoxon_p"] == pytest.approx(stats.wilcoxon(VARIANT, BASE).pvalue, rel=1e-12)
    assert p["wilcoxon_smallest_p"] == 0.0625 and (p["better_in"], p["worse_in"]) == (4, 1)
    base = result["experiments"][0]
    assert base["summary"]["mean"] == pytest.approx(np.mean(BASE))
    assert base["summary"]["std"] == pytest.approx(np.std(BASE, ddof=1))
    assert base["summary"]["ci"] == pytest.approx(
        stats.t.interval(0.95, 4, loc=np.mean(BASE), scale=stats.sem(BASE)), rel=1e-10
    )
    assert base["reduced"]["winner"] == "mean+bn" and base["reduced"]["selection"] == pytest.approx(0.47)
    assert base["evaluations"][0]["label"] == "stage1/reduced/eval-val"
    assert base["evaluations"][0]["value"] == pytest.approx(0.45)
    assert result["experiments"][1]["reduced"] is None
    fold1 = base["folds"][1]  # best (step 3) above final on odd folds
    assert (fold1["final"], fold1["best"], fold1["best_step"]) == pytest.approx((0.398, 0.408, 3))
    # per class: absent classes (NaN) left out, the rest averaged over folds
    classes = {c["class"]: c for c in p["classes"]}
    assert "train" not in classes and classes["road"]["n"] == 5
    assert set(p["moved_most"]) <= set(classes)
    # the best evaluation, fwIoU and one class's IoU as the metric
    assert compare([a, b], use="best")["pairs"][0]["baseline_values"][1] == pytest.approx(0.408)
    assert compare([a, b], metric="fwiou")["pairs"][0]["differences"] == pytest.approx(d)
    road = compare([a, b], metric="class:road")["pairs"][0]

    def final_road(experiment: Path, k: int) -> float:
        summary = json.loads((experiment / "stage1" / f"fold{k}" / "summary.json").read_text())
        return summary["final"]["fold"]["iou"]["road"]

    expected_road = [final_road(b, k) - final_road(a, k) for k in range(5)]
    assert road["differences"] == pytest.approx(expected_road)
    assert classes["road"]["difference"] == pytest.approx(np.mean(expected_road))
    assert road["t_p"] == pytest.approx(stats.ttest_rel(expected_road, np.zeros(5)).pvalue, rel=1e-10)
    with pytest.raises(CompareError, match="--metric class:roads: use miou, fwiou or class:NAME"):
        compare([a, b], metric="class:roads")
    assert all(math.isnan(f["value"]) for f in compare([a, b], metric="class:train")["experiments"][0]["folds"])


def test_a_pair_on_other_shards_fold_assignment_or_selection_is_refused_naming_why(tmp_path, pair):
    a, _ = pair
    runs = a.parent

    def variant(name: str, content: dict | None, shards: Path | None = None) -> Path:
        shards = shards or write_shards(tmp_path / "shards" / name, content)
        for k in range(5):
            write_fold(runs, name, k, VARIANT[k], VARIANT[k], shards)
        return runs / name

    # the same data packed again somewhere else (another source folder): comparable
    assert compare([a, variant("copy", manifest(root="/elsewhere/cs"))])["pairs"][0]["folds"] == [0, 1, 2, 3, 4]

    swapped = manifest()
    swapped["groups"]["train-fold0"], swapped["groups"]["train-fold1"] = (
        swapped["groups"]["train-fold1"], swapped["groups"]["train-fold0"])  # fmt: skip
    with pytest.raises(NotComparableError, match=r"different fold assignment: fold 0 holds out 10 images of aachen, "
                       r"bochum in A \(.*\) but 11 images of bremen, cologne in swapped"):  # fmt: skip
        compare([a, variant("swapped", swapped)])
    with pytest.raises(NotComparableError, match="A's shards have 5 folds, three's 3"):
        compare([a, variant("three", manifest(folds=3))], allow_missing=True)
    with pytest.raises(NotComparableError, match=r"different selection set: 4 images of ulm in A, 4 images of "
                       r"weimar in weimar"):  # fmt: skip
        compare([a, variant("weimar", manifest(selection=("weimar",)))])
    with pytest.raises(NotComparableError, match=r"different shards: manifest hash \w{12} .* differing in "
                       r"groups.train-fold0, .*options.image_format"):  # fmt: skip
        compare([a, variant("jpeg", manifest(image_format="jpg"))])
    # no manifest to check: the same recorded path is accepted with a note, another is refused
    gone = tmp_path / "gone"
    with pytest.raises(NotComparableError, match=rf"trained on .*cityscapes, gone on {gone}, and the manifest"):
        compare([a, variant("gone", None, shards=gone)])
    lost = compare([variant("lost1", None, shards=gone), variant("lost2", None, shards=gone)])
    assert any("manifest.json not found for lost1" in note for note in lost["notes"])
    # the folds of one experiment on different shards
    mixed = variant("mixed", manifest())
    other = write_shards(tmp_path / "shards" / "other", manifest())
    config = yaml.safe_load((mixed / "stage1" / "fold3" / "config.yaml").read_text())
    config["data"]["shards"] = str(other)
    (mixed / "stage1" / "fold3" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(NotComparableError, match="mixed: the folds of stage1 trained on different shards"):
        compare([a, mixed])


def test_a_fold_on_one_side_only_is_refused_unless_allowed(pair):
    a, b = pair
    import shutil

    shutil.rmtree(b / "stage1" / "fold4")
    with pytest.raises(NotComparableError, match=r"fold 4 of A is missing from B \(.*stage1 has folds 0, 1, 2, 3\); "
                       r"pass --allow-missing"):  # fmt: skip
        compare([a, b])
    with pytest.raises(NotComparableError, match="fold 4 of A is missing from B"):
        compare([b, a])  # named the other way round as well
    result = compare([a, b], allow_missing=True)
    assert result["pairs"][0]["folds"] == [0, 1, 2, 3]
    assert "fold 4 of A is missing from B: left out (--allow-missing)" in result["notes"]
    with pytest.raises(CompareError, match="has no stage2/"):
        compare([a, b], stage=2)
    with pytest.raises(CompareError, match="given twice"):
        compare([a, a.parent / "A"])


def test_an_unfinished_fold_is_listed_and_left_out_and_an_unfinished_stage_is_refused(pair, tmp_path):
    a, b = pair
    (b / "stage1" / "fold2" / "summary.json").unlink()
    (b / "stage1" / "fold2" / "model.json").unlink()
    (b / "stage1" / "fold3" / "summary.json").unlink()
    (b / "stage1" / "fold3" / "PREEMPTED").write_text('{"step": 3, "state": "step-00000003"}\n')
    result = compare([a, b])
    assert result["pairs"][0]["folds"] == [0, 1, 4]
    assert "B: stage1/fold2 is in progress (no summary.json); left out" in result["notes"]
    assert "B: stage1/fold3 is preempted (no summary.json); left out" in result["notes"]
    assert "A vs B: fold 2, 3 not finished on both sides; left out" in result["notes"]
    statuses = [f["status"] for f in result["experiments"][1]["folds"]]
    assert statuses == ["done", "done", "in progress", "preempted", "done"]

    shards = write_shards(tmp_path / "s2", manifest())
    write_fold(a.parent, "C", 0, 0.4, 0.4, shards, stage=1, finished=False)
    with pytest.raises(CompareError, match=r"stage1: no fold has finished \(fold0: in progress\)"):
        compare([a, a.parent / "C"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "summary.json").write_text('{"fold": 0, "best": {"mi'), r"summary.json: not valid JSON"),
        (lambda f: (f / "summary.json").write_text('{"fold": 0, "best": {"miou": 0.4}, "final": {}}'),
         r"summary.json: best.step is missing, expected int"),
        (lambda f: (f / "summary.json").write_text("[1, 2]"), r"summary.json: expected a JSON object, found list"),
        (lambda f: (f / "metrics.jsonl").write_text('{"step": 1, "epoch": 0.3}\n{"step": 2, "ep\n{}\n'),
         r"metrics.jsonl:2: not a JSON record"),
        (lambda f: (f / "config.yaml").write_text("data: [unclosed\n"), r"config.yaml: not a readable YAML config"),
        (lambda f: (f.parent / "reduced").mkdir() or (f.parent / "reduced" / "report.json").write_text('{"x": 1}'),
         r"report.json: selection is missing, expected dict"),
    ],
)  # fmt: skip
def test_a_malformed_file_is_an_error_naming_it(pair, damage, message, capsys):
    a, b = pair
    fold = b / "stage1" / "fold1"
    damage(fold)
    with pytest.raises(CompareError, match=message):
        compare([a, b])
    from tools.compare import main

    assert main([str(a), str(b), "--out", str(a.parent / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(b / "stage1") in err
    assert not (a.parent / "out").exists()


def test_the_command_line_end_to_end(pair):
    a, b = pair
    env = os.environ | {"MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "compare.py"), str(a), str(b)],
        capture_output=True, text=True, timeout=120, env=env, cwd=a.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = a.parent / "comparisons" / "A-vs-B-stage1"
    assert {p.name for p in out.iterdir()} == {
        "compare.md", "compare.json", "per_fold.png", "differences.png", "per_class.png"}  # fmt: skip
    assert stat.S_IMODE(out.stat().st_mode) & 0o055 == 0o055  # readable by others under umask 022
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 100
    text = (out / "compare.md").read_text()
    # mIoU in percent everywhere: the per-fold table, the differences, means and the reduced model
    assert "| 0 | **41.20** | 41.20 | **43.10** | 43.10 | +1.90 |" in text
    assert "| 1 | **39.80** | 40.80 | **40.50** | 40.50 | +0.70 |" in text
    pooled_a = "unavailable (fold 0, 1, 2, 3, 4: no confusion matrix)"  # summaries without the matrix
    assert f"| A | 5 | {pooled_a} | {100 * np.mean(BASE):.2f} | {100 * np.std(BASE, ddof=1):.2f} |" in text
    assert "| mean+bn | 47.00 (train-selection) | 45.00 (`stage1/reduced/eval-val`) |" in text
    d = np.subtract(VARIANT, BASE)
    low, high = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    ttest = stats.ttest_rel(VARIANT, BASE)
    assert (f"| B | 0, 1, 2, 3, 4 | {100 * d.mean():+.2f} | [{100 * low:+.2f}, {100 * high:+.2f}] | "
            f"{ttest.statistic:.3f} (4) | {ttest.pvalue:.4f} | 1 | 0.1250 | 4 / 1 |") in text  # fmt: skip
    assert "cannot give a p-value below 0.0625" in text and "so it can never reach 0.05" in text
    assert "## Per class: B - A" in text and "Moved most: up" in text
    assert "![per-class differences](per_class.png)" in text
    # the printed tables are the file's
    assert "| 0 | **41.20** | 41.20 | **43.10** | 43.10 | +1.90 |" in done.stdout
    assert f"comparison: {out / 'compare.md'}" in done.stdout
    saved = json.loads((out / "compare.json").read_text())
    assert saved["pairs"][0]["t_p"] == pytest.approx(ttest.pvalue, rel=1e-10)
    assert saved["experiments"][0]["folds"][0]["iou"]["train"] is None  # strict JSON: NaN -> null

    # a rerun replaces it; an --out that holds something else is refused
    (out / "stale.png").write_bytes(b"old")
    from tools.compare import main

    assert main([str(a), str(b)]) == 0 and not (out / "stale.png").exists()
    (a.parent / "precious").mkdir()
    (a.parent / "precious" / "notes.txt").write_text("keep")
    assert main([str(a), str(b), "--out", str(a.parent / "precious")]) == 2
    assert (a.parent / "precious" / "notes.txt").read_text() == "keep"


def test_three_experiments_against_the_baseline(pair, tmp_path):
    a, b = pair
    shards = Path(yaml.safe_load((a / "stage1" / "fold0" / "config.yaml").read_text())["data"]["shards"])
    for k in range(5):
        write_fold(a.parent, "C", k, BASE[k] - 0.01, BASE[k], shards)
    from tools.compare import main

    assert main([str(a), str(b), str(a.parent / "C"), "--out", str(tmp_path / "three")]) == 0
    saved = json.loads((tmp_path / "three" / "compare.json").read_text())
    assert [p["candidate"] for p in saved["pairs"]] == ["B", "C"]
    assert saved["pairs"][1]["differences"] == pytest.approx([-0.01] * 5)
    assert saved["pairs"][1]["t_p"] is None or saved["pairs"][1]["t_p"] < 1e-6  # constant differences
    assert {"per_class_1.png", "per_class_2.png"} <= {p.name for p in (tmp_path / "three").iterdir()}


def test_wandb_logs_one_offline_compare_run_grouped_by_the_experiments(pair, tmp_path, monkeypatch):
    a, b = pair
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    from tools.compare import main

    out = tmp_path / "cmp"
    assert main([str(a), str(b), "--out", str(out), "--wandb"]) == 0
    import wandb

    wandb.teardown()
    (record_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    run = run_record(record_file)
    assert (run.job_type, run.run_group, run.display_name) == ("compare", "compare-A-vs-B", "compare-A-vs-B-s1")
    data = record_file.read_bytes()
    assert b"compare/pairs" in data and b"compare/classes" in data and b"compare/figures" in data
    assert b"compare/differences" in data  # what the experiments differ in, as compare.md leads with


def test_the_pooled_out_of_fold_score_sits_beside_the_mean_and_folds_without_a_matrix_are_named(pair):
    """B's results carry their confusion matrices (final in summary.json, best in metrics.jsonl,
    as seg/train.py writes them); A's predate them."""
    from seg.analysis.compare_output import comparison_tables
    from seg.evaluation.metrics import pooled

    a, b = pair
    rng = np.random.default_rng(0)
    final, best = [], []
    for k in range(5):
        fold = b / "stage1" / f"fold{k}"
        summary = json.loads((fold / "summary.json").read_text())
        matrices = [rng.integers(0, 50 * (k + 1), (19, 19)).tolist() for _ in range(2)]  # unbalanced folds
        summary["final"]["fold"]["confusion"] = matrices[0]
        (fold / "summary.json").write_text(json.dumps(summary))
        records = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
        for record in records:
            if "fold/miou" in record:  # step 3 and the final step 6
                record["fold/confusion"] = matrices[1] if record["step"] == 3 else matrices[0]
        (fold / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        final.append(matrices[0])
        best.append(matrices[1])
    result = compare([a, b])
    base, other = result["experiments"]
    assert base["out_of_fold"]["value"] is None and base["out_of_fold"]["missing"] == [0, 1, 2, 3, 4]
    assert other["out_of_fold"]["value"] == pytest.approx(pooled(final)["miou"], abs=1e-12)
    assert other["out_of_fold"]["value"] != pytest.approx(other["summary"]["mean"])
    text = "\n".join(comparison_tables(result))
    assert "| experiment | folds | pooled out-of-fold mIoU | mean mIoU | std | 95% CI |" in text
    assert f"| B | 5 | {100 * pooled(final)['miou']:.2f} | {100 * np.mean(VARIANT):.2f} |" in text
    assert "| A | 5 | unavailable (fold 0, 1, 2, 3, 4: no confusion matrix) |" in text
    assert "**pooled out-of-fold** mIoU: one confusion matrix over every held-out image" in text
    best_steps = {k: json.loads((b / "stage1" / f"fold{k}" / "summary.json").read_text())["best"]["step"]
                  for k in range(5)}  # fmt: skip
    used = compare([a, b], use="best")["experiments"][1]["out_of_fold"]
    # best is at step 3 where best > final; elsewhere the final (step 6) evaluation, with the final matrix
    expected = [best[k] if best_steps[k] == 3 else final[k] for k in range(5)]
    assert used["value"] == pytest.approx(pooled(expected)["miou"], abs=1e-12)


def test_one_fold_per_side_says_there_is_no_interval(tmp_path):
    """With one pair the t quantile printed used to be df=1's (12.71) beside '0 degrees of freedom'."""
    runs = tmp_path / "runs"
    shards = write_shards(tmp_path / "shards" / "cityscapes", manifest(folds=1))
    write_fold(runs, "A", 0, 0.41, 0.42, shards)
    write_fold(runs, "B", 0, 0.43, 0.43, shards)
    from seg.analysis.compare_output import caveat

    text = " ".join(caveat(compare([runs / "A", runs / "B"])))
    assert "0 degrees of freedom" not in text and "12.71" not in text
    assert "one fold per side there is no interval" in text


def identity(level: str, processes: int, start: str) -> dict:
    """A fold identity as seg/recipe/identity.py records it in summary.json."""
    return {"config": {"data": {"level": level, "size": [32, 64]}, "model": {"depth": 18}}, "stage": 1,
            "init_from": {"path": f"/somewhere/{processes}/model.safetensors", "model": start},
            "data": {"manifest_sha256": "ab" * 32},
            "batch": {"processes": processes, "per_process": 8 // processes, "grad_accum": 1, "global": 8},
            "schedule": {"steps_per_epoch": 3, "total_steps": 6}, "code": f"commit{processes}"}  # fmt: skip


def test_the_comparison_leads_with_what_the_experiments_differ_in(pair, tmp_path, capsys):
    """Standard against no augmentation: the comparison never said that the two differ in data.level."""
    a, b = pair
    for k in range(5):  # B: no augmentation, in its configs (no identity recorded, as an older seg wrote)
        path = b / "stage1" / f"fold{k}" / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config["data"]["level"] = "none"
        config["wandb"]["images"] = 8  # not what a run is: left out
        path.write_text(yaml.safe_dump(config))
    from tools.compare import main

    out = tmp_path / "cmp"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        "differs: B vs A (from the folds' configs (no identity recorded)): config.data.level: 'standard' -> 'none'\n"
    )
    text = (out / "compare.md").read_text()
    assert "## What differs" in text and "- `config.data.level`: 'standard' -> 'none'" in text
    assert text.index("## What differs") < text.index("## Results") and "wandb" not in text.split("## Results")[0]
    saved = json.loads((out / "compare.json").read_text())
    assert list(saved)[:7] == ["stage", "metric", "metric_title", "use", "confidence", "baseline", "differences"]
    (entry,) = saved["differences"]
    assert (entry["baseline"], entry["candidate"]) == ("A", "B")
    assert entry["differences"] == ["config.data.level: 'standard' -> 'none'"]

    # recorded identities (seg/recipe/identity.py's) are compared as the chain compares them: processes and
    # code may differ, the start model's content may not
    for side, start, processes in ((a, "sha256:aaa", 1), (b, "sha256:bbb", 2)):
        for k in range(5):
            path = side / "stage1" / f"fold{k}" / "summary.json"
            summary = json.loads(path.read_text())
            summary["identity"] = identity("standard" if side == a else "none", processes, start)
            path.write_text(json.dumps(summary))
    saved = compare([a, b])["differences"][0]
    assert saved["from"] == "the folds' recorded identities (summary.json)"
    assert saved["differences"] == ["config.data.level: 'standard' -> 'none'",
                                    "init_from.model: 'sha256:aaa' -> 'sha256:bbb'"]  # fmt: skip


def record_manifest(experiment: Path, sha: str) -> None:
    """Each fold's summary.json identity records the manifest ``sha`` it trained on, as seg/train.py does."""
    for summary_path in experiment.glob("stage1/fold*/summary.json"):
        summary = json.loads(summary_path.read_text())
        summary["identity"] = identity("standard", 1, "scratch") | {"data": {"manifest_sha256": sha}}
        summary_path.write_text(json.dumps(summary))


def test_experiments_trained_on_a_pack_replaced_at_the_same_path_are_refused(pair, tmp_path, capsys):
    """A trained on shards/cityscapes, which was repacked there with another fold assignment before B trained:
    the comparison used to read today's manifest for both and pair them."""
    a, b = pair
    shards = tmp_path / "shards" / "cityscapes"
    before = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    record_manifest(a, before)
    swapped = manifest()
    swapped["groups"]["train-fold0"], swapped["groups"]["train-fold1"] = (
        swapped["groups"]["train-fold1"], swapped["groups"]["train-fold0"])  # fmt: skip
    write_shards(shards, swapped)  # repacked in place (--overwrite)
    after = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    record_manifest(b, after)
    with pytest.raises(NotComparableError, match=rf"A's folds trained on manifest sha256 {before}, B's on {after} .*"
                       rf"now has sha256 {after}, not the {before} the folds recorded"):  # fmt: skip
        compare([a, b])
    from tools.compare import main

    assert main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: A and B are not comparable: different shards") and err.count("\n") == 1

    # both trained on the earlier pack: comparable by their records, whatever is at the path now
    record_manifest(b, before)
    result = compare([a, b])
    assert result["pairs"][0]["folds"] == [0, 1, 2, 3, 4]
    assert result["experiments"][1]["recorded_manifest_sha256"] == before


def test_stage_folders_given_for_experiments_are_refused_with_the_folders_to_pass(pair, capsys):
    a, b = pair
    from tools.compare import main

    assert main([str(a / "stage1"), str(b / "stage1")]) == 2
    assert capsys.readouterr().err == (
        f"error: no stage{{s}}/ folder common to {a / 'stage1'}, {b / 'stage1'}: pass runs/<experiment> folders "
        f"(those holding stage{{s}}/), e.g. {a} {b} --stage 1\n"
    )
    (b.parent / "empty").mkdir()  # not a stage folder: the hint without the example
    with pytest.raises(CompareError, match=r"pass runs/<experiment> folders \(those holding stage\{s\}/\)$"):
        compare([a, b.parent / "empty"])


def test_an_evaluation_on_another_pack_is_left_out_of_val_miou(pair, tmp_path):
    """tools/evaluate.py --shards of another pack wrote into the reduced model's eval-val folder: the comparison put
    its score (other images) in the val column beside B's own val, without a word."""
    a, b = pair
    write_reduction(b.parent, "B", list(range(5)), 0.48, tmp_path / "shards" / "cityscapes")
    other = write_shards(tmp_path / "shards" / "other", manifest(selection=("weimar",)))
    path = a / "stage1" / "reduced" / "eval-val" / "metrics.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"shards": str(other)}))
    result = compare([a, b])
    assert result["experiments"][0]["evaluations"] == [] and len(result["experiments"][1]["evaluations"]) == 1
    assert any(n.startswith(f"A: stage1/reduced/eval-val is on other shards (shards {other} (manifest sha256 ")
               for n in result["notes"])  # fmt: skip
    # by the manifest sha256 an evaluation records, when it does
    sha = hashlib.sha256((tmp_path / "shards" / "cityscapes" / "manifest.json").read_bytes()).hexdigest()
    path.write_text(json.dumps(json.loads(path.read_text()) | {"manifest_sha256": sha}))
    assert len(compare([a, b])["experiments"][0]["evaluations"]) == 1
    path.write_text(json.dumps(json.loads(path.read_text()) | {"shards": "x", "manifest_sha256": "ef" * 32}))
    assert compare([a, b])["experiments"][0]["evaluations"] == []


def test_val_evaluations_under_different_test_time_settings_are_flagged_naming_each(pair, tmp_path):
    """A's reduced model evaluated with flips at full size, B's plain at its training size: the val column
    set the two side by side without a word, as if the experiments made the difference."""
    a, b = pair
    write_reduction(b.parent, "B", list(range(5)), 0.48, tmp_path / "shards" / "cityscapes")
    plain = {"input_size": "192x96", "input_size_from": "the model's config (data.eval_size)", "mode": "whole",
             "flip": False, "scales": [1.0]}  # fmt: skip
    flipped = plain | {"input_size": "full", "input_size_from": "--input-size", "flip": True, "scales": [0.75, 1.0]}
    for side, settings in ((a, flipped), (b, plain)):
        path = side / "stage1" / "reduced" / "eval-val" / "metrics.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"settings": settings}))
    assert (
        "the val evaluations share no test-time setting (A: input full resolution, whole, flip, scales 0.75, 1; "
        "B: input 192x96, whole, no flip, scales 1): their val mIoU are not comparable with each other"
    ) in "\n".join(compare([a, b])["notes"])
    # the same setting on both sides (where it came from aside): nothing to say
    path = a / "stage1" / "reduced" / "eval-val" / "metrics.json"
    same = plain | {"input_size_from": "--input-size"}
    path.write_text(json.dumps(json.loads(path.read_text()) | {"settings": same}))
    assert not any("test-time setting" in n for n in compare([a, b])["notes"])
    path.write_text(json.dumps(json.loads(path.read_text()) | {"settings": {"mode": "whole"}}))
    with pytest.raises(CompareError, match=f"^{path}: settings has no 'input_size'; rerun tools/evaluate.py"):
        compare([a, b])
