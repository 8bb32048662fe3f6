import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seg.core.cli import Size
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from seg.model.deeplab import DeepLabV3Plus
from seg.model.weights import WeightsError, export_weights
from seg.recipe.config import load_config, to_dict
from seg.reduction.soup import FoldModel, average, greedy_soup, load_fold_models, recalibrate_batchnorm

REPO = Path(__file__).resolve().parents[1]


def small_model(seed: int, depth: int = 18) -> DeepLabV3Plus:
    torch.manual_seed(seed)
    return DeepLabV3Plus(depth, 8)


def write_fold(
    stage: Path, fold: int, model: torch.nn.Module, miou: float, identity: dict | None = None, **config_overrides: str
) -> None:
    overrides = {"model.output_stride": "8", **config_overrides}  # the models above
    config = load_config(REPO / "configs" / "demo.yaml", [f"{k}={v}" for k, v in overrides.items()])
    (stage / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    sidecar = {"config": to_dict(config), "fold": fold, "stage": 1, "metrics": {"fold": {"miou": miou}}}
    sidecar |= {"identity": identity} if identity else {}
    export_weights(model, stage / f"fold{fold}" / "best.safetensors", sidecar)


def test_the_mean_of_identical_models_is_that_model():
    state = small_model(0).state_dict()
    mean = average([state, state, state])
    for name, tensor in state.items():
        assert torch.equal(mean[name], tensor), name


def test_the_mean_of_two_known_state_dicts_is_their_mean_in_float64():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "n": torch.tensor(3), "b": torch.tensor([0.1])}
    b = {"w": torch.tensor([2.0, 5.0], dtype=torch.float16), "n": torch.tensor(6), "b": torch.tensor([0.2])}
    mean = average([a, b])
    assert mean["w"].dtype == torch.float16 and mean["w"].tolist() == [1.5, 3.5]
    assert mean["b"].item() == pytest.approx(0.15)
    assert mean["n"].dtype == a["n"].dtype and mean["n"].item() == 4  # 4.5 rounds to even


def test_integer_buffers_survive_averaging():
    models = [small_model(seed) for seed in range(3)]
    for count, model in zip((10, 20, 31), models, strict=True):
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.num_batches_tracked.fill_(count)
    mean = average([m.state_dict() for m in models])
    tracked = [k for k in mean if k.endswith("num_batches_tracked")]
    assert tracked and all(mean[k].dtype == torch.int64 and mean[k].item() == 20 for k in tracked)
    DeepLabV3Plus(18, 8).load_state_dict(mean)  # a model takes it as it is


def _fold(fold: int, miou: float, value: float) -> FoldModel:
    return FoldModel(fold, Path(f"fold{fold}"), {"w": torch.tensor([value])}, {"metrics": {"fold": {"miou": miou}}})


@pytest.mark.parametrize("seed", range(5))
def test_greedy_soup_never_scores_below_the_best_single_fold(seed):
    generator = torch.Generator().manual_seed(seed)
    models = [_fold(k, torch.rand(1, generator=generator).item(), torch.randn(1, generator=generator).item())
              for k in range(5)]  # fmt: skip
    target = torch.randn(1, generator=generator).item()

    def score(soup: list[FoldModel]) -> float:  # a selection score peaked somewhere among the folds
        return -abs(average([m.state for m in soup])["w"].item() - target)

    soup, value = greedy_soup(models, score)
    best_single = max(models, key=lambda m: score([m]))  # on the selection set, not by fold mIoU
    assert soup[0] is best_single
    assert value >= max(score([m]) for m in models)
    assert value == pytest.approx(score(soup))


def test_bn_recalibration_changes_only_bn_buffers():
    model = small_model(0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(2, 3, 32, 64) for _ in range(3)]
    recalibrate_batchnorm(model, batches)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert any(k.endswith("running_mean") for k in changed)
    assert not model.training  # its mode is restored


def test_bn_recalibration_is_the_same_in_every_run_whatever_the_global_generator():
    """Dropout is on while BN re-estimates (train mode): its masks come from a seeded generator,
    not from whatever state torch's global one is in (a reduction never seeds it). Found by
    tools/chaos.py: two chains' reductions scored their +bn soups differently."""
    model = small_model(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    results = []
    for draw in (1, 2):
        model.load_state_dict(state)
        torch.manual_seed(draw)  # another process, another state of the global generator
        recalibrate_batchnorm(model, batches, seed=5)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in state)
    after = torch.rand(1)
    torch.manual_seed(2)
    assert torch.equal(after, torch.rand(1))  # the global generator is left where it was
    model.load_state_dict(state)
    recalibrate_batchnorm(model, batches, seed=6)  # another seed, other dropout masks
    assert not all(torch.equal(results[0][k], model.state_dict()[k]) for k in state)


def test_mismatched_or_missing_folds_are_refused_naming_the_difference(tmp_path):
    write_fold(tmp_path / "depth", 0, small_model(0), 0.5)
    write_fold(tmp_path / "depth", 1, small_model(1, depth=34), 0.6, **{"model.depth": "34"})
    with pytest.raises(WeightsError, match=r"folds 0 and 1 differ in model.depth: 18 vs 34"):
        load_fold_models(tmp_path / "depth", [0, 1])

    write_fold(tmp_path / "classes", 0, small_model(0), 0.5)
    other = small_model(1)
    other.classifier = torch.nn.Conv2d(256, 7, 1)
    write_fold(tmp_path / "classes", 1, other, 0.6)
    with pytest.raises(WeightsError, match=r"differ in classifier.bias: \(19,\) torch.float32 vs \(7,\)"):
        load_fold_models(tmp_path / "classes", [0, 1])

    # one experiment: folds differ in their length and where they ran, not in what they train
    identity = {"config": {"optim": {"lr": 1e-3}}, "stage": 1, "init_from": {"path": None, "model": "scratch"},
                "batch": {"processes": 2, "per_process": 2, "grad_accum": 1, "global": 4},
                "schedule": {"steps_per_epoch": 3, "total_steps": 9}, "code": "abc"}  # fmt: skip
    elsewhere = identity | {"batch": {"processes": 1, "per_process": 4, "grad_accum": 1, "global": 4},
                            "schedule": {"steps_per_epoch": 4, "total_steps": 12}, "code": "def"}  # fmt: skip
    write_fold(tmp_path / "runs", 0, small_model(0), 0.5, identity)
    write_fold(tmp_path / "runs", 1, small_model(1), 0.6, elsewhere)
    assert [m.fold for m in load_fold_models(tmp_path / "runs", [0, 1])] == [0, 1]
    write_fold(tmp_path / "runs", 1, small_model(1), 0.6, identity | {"config": {"optim": {"lr": 3e-4}}})
    with pytest.raises(WeightsError, match=r"folds 0 and 1 were trained as different runs \(config.optim.lr: 0.001 "):
        load_fold_models(tmp_path / "runs", [0, 1])

    with pytest.raises(WeightsError, match="fold 2 has no best weights"):
        load_fold_models(tmp_path / "classes", [0, 2])
    (tmp_path / "classes" / "fold1" / "best.safetensors").write_bytes(b"truncated")
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_fold_models(tmp_path / "classes", [0, 1])


def candidate_rows(markdown: str) -> list[tuple[str, str]]:
    """(candidate, folds) of every row of a reduction's markdown table."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| candidate |")) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((cells[0].split(" (the same model as ")[0], cells[1]))  # the name, without the note
    return rows


def selection_shards(tmp_path: Path, train: int, val: int) -> Path:
    """A tiny synthetic Cityscapes packed into 2 folds with the city bochum held out for selection."""
    root = tmp_path / "cityscapes"
    make_synthetic(root, counts={"train": train, "val": val, "test": 0}, cities={"train": 3, "val": 1, "test": 1},
                   size=Size(32, 64), progress=False)  # fmt: skip
    shards = tmp_path / "shards"
    pack(root, shards, Options(folds=2, splits=("train", "val"), selection_cities=("bochum",)), progress=False)
    return shards


def test_reduce_folds_end_to_end(tmp_path):
    """Two folds trained for real, reduced on the held-out selection city."""
    shards = selection_shards(tmp_path, train=14, val=2)
    common = [f"data.shards={shards}", f"train.runs_dir={tmp_path / 'runs'}", "data.size=[32,64]",
              "data.eval_size=null", "data.workers=0", "train.batch_size=2", "wandb.mode=disabled"]  # fmt: skip
    train = [sys.executable, str(REPO / "seg" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml")]
    for fold in (0, 1):
        done = subprocess.run([*train, "--fold", str(fold), *common, "train.epochs=2"],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    stage = tmp_path / "runs" / "demo" / "stage1"
    killed = stage / ".reduced.partial-k1ll3d"  # an earlier reduction's, killed mid-write
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"torn")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "reduce_folds.py"), str(stage), "--recalibrate", "2"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert not killed.exists()
    report = json.loads((stage / "reduced" / "report.json").read_text())
    names = [c["name"] for c in report["candidates"]]
    known = {*names, *(alias for c in report["candidates"] for alias in c.get("aliases", []))}
    assert names[:2] == ["fold0", "fold1"] and {"best", "mean", "top2", "greedy", "mean+bn"} <= known
    assert report["selection"] == {"group": "train-selection", "is_official_val": False,
                                   "samples": report["selection"]["samples"]}  # fmt: skip
    scores = {c["name"]: c["miou"] for c in report["candidates"]}
    assert scores["greedy"] >= max(scores["fold0"], scores["fold1"]) - 1e-12
    assert report["winner"]["miou"] == max(v for k, v in scores.items() if not k.startswith("fold"))
    assert (stage / "reduced" / "reduction.png").is_file()
    # Every candidate has its row in report.md with its folds, the winner's name in bold. Which
    # candidate wins (and, with 2 folds, which name a set of folds is first listed under)
    # depends on training: only the invariant is asserted, never one run's winner.
    rows = candidate_rows((stage / "reduced" / "report.md").read_text())
    listed = {name.strip("*") for name, _ in rows}
    assert listed == set(names)
    assert [name for name, _ in rows if name.startswith("**")] == [f"**{report['winner']['name']}**"]
    folds_of = {c["name"]: ", ".join(map(str, c["folds"])) for c in report["candidates"]}
    assert all(folds == folds_of[name.strip("*")] for name, folds in rows)
    weights = load_file(stage / "reduced" / "model.safetensors")
    assert set(weights) == set(load_file(stage / "fold0" / "best.safetensors"))
    # the reduced model says what its folds share: their identity less the per-fold parts
    shared = json.loads((stage / "reduced" / "model.json").read_text())["identity"]
    fold_identity = json.loads((stage / "fold0" / "best.json").read_text())["identity"]
    assert shared["stage"] == 1 and shared["config"] == fold_identity["config"] and "schedule" not in shared
    assert shared["batch"] == {"global": 2} and shared["init_from"] == {"model": "scratch"}

    # the reduced model seeds the next stage, and the stage-2 fold records which one
    weights_bytes = (stage / "reduced" / "model.safetensors").read_bytes()
    done = subprocess.run([*train, "--fold", "0", "--stage", "2", "--init-from",
                           str(stage / "reduced" / "model.safetensors"), *common, "train.epochs=1"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    stage2 = json.loads((tmp_path / "runs" / "demo" / "stage2" / "fold0" / "summary.json").read_text())["identity"]
    assert stage2["init_from"]["path"] == str(stage / "reduced" / "model.safetensors")
    assert stage2["init_from"]["model"] == "sha256:" + hashlib.sha256(weights_bytes).hexdigest()

    # another pack (here one without a selection subset): refused before its selection set is read, naming the
    # sha256 the folds' identities recorded and the pack's (test_cv pins the no-selection-subset error)
    pack(tmp_path / "cityscapes", tmp_path / "plain", Options(folds=2, splits=("train", "val")), progress=False)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "reduce_folds.py"), str(stage), "--shards",
                           str(tmp_path / "plain")], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 2 and fold_identity["data"]["manifest_sha256"] in done.stderr
    assert hashlib.sha256((tmp_path / "plain" / "manifest.json").read_bytes()).hexdigest() in done.stderr


# --- fold ensembles -------------------------------------------------------------------------------


def test_an_ensemble_of_one_model_is_that_model():
    from seg.data.augment import DeviceAugment
    from seg.evaluation.ensemble import Ensemble
    from seg.evaluation.evaluate import evaluate
    from seg.evaluation.inference import TestTimeAugmentation, predict_probabilities

    model = small_model(0).eval()
    ensemble = Ensemble([model]).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(ensemble(x), model(x))
    for tta in (TestTimeAugmentation(), TestTimeAugmentation(flip=True, scales=(0.75, 1.0))):
        assert torch.equal(
            predict_probabilities(ensemble, x, (40, 60), tta), predict_probabilities(model, x, (40, 60), tta)
        )
    generator = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (1, 3, 32, 48), generator=generator, dtype=torch.uint8),
                "label": torch.randint(0, 19, (1, 32, 48), generator=generator), "key": [str(i)]}
               for i in range(3)]  # fmt: skip
    normalise, cpu = DeviceAugment("none"), torch.device("cpu")
    alone, _, _ = evaluate(model, batches, cpu, normalise)
    together, _, _ = evaluate(ensemble, batches, cpu, normalise)
    assert torch.equal(alone.matrix, together.matrix) and alone.compute() == together.compute()


def test_an_ensemble_of_k_models_averages_their_probabilities():
    from seg.evaluation.ensemble import Ensemble
    from seg.evaluation.inference import TestTimeAugmentation, predict_probabilities

    models = [small_model(seed).eval() for seed in range(3)]
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        by_hand = torch.stack([m(x).softmax(1) for m in models]).mean(0)
        flipped = torch.stack([m(x.flip(-1)).flip(-1).softmax(1) for m in models]).mean(0)
    ensemble = Ensemble(models).eval()
    probabilities = predict_probabilities(ensemble, x, (32, 48), TestTimeAugmentation())
    torch.testing.assert_close(probabilities, by_hand, atol=1e-6, rtol=1e-5)
    both = predict_probabilities(ensemble, x, (32, 48), TestTimeAugmentation(flip=True))
    torch.testing.assert_close(both, (by_hand + flipped) / 2, atol=1e-6, rtol=1e-5)


def test_ensemble_members_are_resolved_and_checked(tmp_path):
    from seg.evaluation.ensemble import Ensemble, load_models, resolve_members, write_ensemble_file

    stage = tmp_path / "stage1"
    for fold in range(3):
        write_fold(stage, fold, small_model(fold), 0.5)
    files = [stage / f"fold{k}" / "best.safetensors" for k in range(3)]
    assert resolve_members([stage]) == files  # a stage folder: its folds' best weights
    (stage / "reduced").mkdir()
    content = write_ensemble_file(stage / "reduced" / "ensemble.json", files[:2])
    assert content["members"] == ["../fold0/best.safetensors", "../fold1/best.safetensors"]
    (stage / "reduced" / "ensemble.json").write_text(json.dumps(content))
    assert [p.resolve() for p in resolve_members([stage])] == [f.resolve() for f in files[:2]]  # its ensemble.json
    model, sidecar, members = load_models([stage / "reduced" / "ensemble.json"])
    assert isinstance(model, Ensemble) and len(model.members) == 2 and sidecar["ensemble"] == list(map(str, members))
    single, _, _ = load_models(files[:1])
    assert not isinstance(single, Ensemble)  # one model file: that model

    write_fold(tmp_path / "other", 0, small_model(5), 0.5, **{"data.eval_size": "[48,96]"})
    with pytest.raises(WeightsError, match=r"differ in data.eval_size: \[96, 192\] vs \[48, 96\]"):
        load_models([files[0], tmp_path / "other" / "fold0" / "best.safetensors"])
    write_fold(tmp_path / "deeper", 0, small_model(6, depth=34), 0.5, **{"model.depth": "34"})
    with pytest.raises(WeightsError, match=r"differ in model.depth: 18 vs 34"):
        load_models([files[0], tmp_path / "deeper" / "fold0" / "best.safetensors"])


def test_when_the_ensemble_wins_a_single_model_seeds_the_next_stage_and_the_choice_is_the_users():
    from seg.reduction.candidates import Candidate, seed_candidate

    models = [_fold(k, 0.5, float(k)) for k in range(3)]
    candidates = [Candidate(f"fold{m.fold}", [m], result={"miou": 0.40 + 0.01 * m.fold}) for m in models]
    candidates += [Candidate("mean", models, result={"miou": 0.45}),
                   Candidate("greedy", models[1:], result={"miou": 0.46}),
                   Candidate("ensemble", models, result={"miou": 0.50}, ensemble=True)]  # fmt: skip
    assert [c.cost for c in candidates] == [1, 1, 1, 1, 1, 3]
    assert [c.kind for c in candidates][-3:] == ["soup", "soup", "ensemble"]
    seed, why = seed_candidate(candidates, candidates[-1], "best-single")
    assert seed.name == "greedy" and "The ensemble won the selection (50.00% against 46.00%)" in why
    seed, why = seed_candidate(candidates, candidates[-1], "mean")
    assert seed.name == "mean" and "--seed-from mean" in why
    assert seed_candidate(candidates, candidates[4], "best-single")[0].name == "greedy"  # a soup won: itself
    with pytest.raises(ValueError, match=r"--seed-from top9: not a single-model candidate .*fold0, .*greedy\)"):
        seed_candidate(candidates, candidates[-1], "top9")


def two_fold_stage(tmp_path: Path, identity: dict | None = None) -> tuple[Path, Path]:
    """Fold models 0 and 1 written directly (no training) into runs/x/stage1, on packed shards
    with a selection city: (shards, stage folder)."""
    shards = selection_shards(tmp_path, train=8, val=1)
    stage = tmp_path / "runs" / "x" / "stage1"
    for fold in range(2):
        write_fold(stage, fold, small_model(fold).eval(), 0.3 + 0.1 * fold, identity, **{"data.shards": str(shards),
                   "data.eval_size": "null", "data.workers": "0", "wandb.mode": "disabled"})  # fmt: skip
    return shards, stage


def test_the_reduction_evaluates_the_ensemble_beside_the_soups_and_reports_each_cost(tmp_path, capsys):
    """Fold models written directly (no training), reduced on a packed selection city."""
    from seg.evaluation.ensemble import load_models
    from seg.reduction.reduce import reduce_stage

    shards, stage = two_fold_stage(tmp_path)
    report = reduce_stage(stage, k=2)
    printed = capsys.readouterr().out  # mIoU in percent, with its sign, as train.py prints it
    assert "   fold0: selection-set mIoU " in printed and "seeds the next stage: " in printed
    assert re.findall(r"mIoU[^\n]*? (\d+\.\d)\b(?!%)", printed) == []
    by_name = {c["name"]: c for c in report["candidates"]}
    assert {"fold0", "fold1", "best", "mean", "top2", "greedy", "ensemble"} <= set(by_name)
    assert by_name["ensemble"]["cost"] == 2 and by_name["ensemble"]["kind"] == "ensemble"
    assert all(c["cost"] == 1 for name, c in by_name.items() if name != "ensemble")
    assert report["seed"]["name"] != "ensemble"
    if report["winner"]["name"] == "ensemble":
        assert "The ensemble won the selection" in report["seed"]["why"]
    # the ensemble's score is that of its members' ensemble, evaluated as the tools do
    from seg.data.augment import DeviceAugment
    from seg.data.loader import eval_loader
    from seg.evaluation.evaluate import evaluate

    ensemble, _, members = load_models([stage / "reduced" / "ensemble.json"])
    assert [p.resolve() for p in members] == [(stage / f"fold{k}" / "best.safetensors").resolve() for k in range(2)]
    loader, _ = eval_loader(shards, ["train-selection"], 1, None, workers=0, checksums=False)
    matrix, _, _ = evaluate(ensemble, loader, torch.device("cpu"), DeviceAugment("none"))
    assert matrix.compute()["miou"] == pytest.approx(by_name["ensemble"]["miou"], abs=1e-12)
    text = (stage / "reduced" / "report.md").read_text()
    assert "| kind | forward passes per image |" in text and "| ensemble | 2 |" in text
    assert "`reduced/model.safetensors`, the model the next stage starts from:" in text
    assert "pooled: unavailable (fold 0, 1 have no confusion matrix" in text  # no summary.json written here
    seed = load_file(stage / "reduced" / "model.safetensors")
    assert set(seed) == set(load_file(stage / "fold0" / "best.safetensors"))


def test_a_model_file_whose_sidecar_describes_another_model_names_the_keys_and_shapes(tmp_path):
    from seg.model.weights import load_model

    config = load_config(REPO / "configs" / "demo.yaml", ["data.shards=unused"])  # depth 18
    export_weights(DeepLabV3Plus(18, 16), tmp_path / "model.safetensors", {"config": to_dict(config)})
    sidecar = json.loads((tmp_path / "model.json").read_text())
    sidecar["config"]["model"]["depth"] = 50  # a sidecar of another model beside these weights
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    with pytest.raises(WeightsError) as refused:
        load_model(tmp_path / "model.safetensors")
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'model.safetensors'}: does not fit the model its sidecar describes (")
    assert "depth=50" in message and "missing 198, e.g. backbone.layer1.0.conv3.weight (256, 64, 1, 1)" in message
    assert "other shapes" in message and "in the file" in message and "copy both again" in message


def test_a_mistyped_stage_folder_is_refused_and_nothing_is_created(tmp_path, capsys):
    from tools.reduce_folds import main

    typo = tmp_path / "nonexist" / "typo" / "stage1"
    assert main([str(typo)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {typo}: no such folder; pass runs/<experiment>/stage{{s}}, the folder holding fold*/\n"
    assert list(tmp_path.iterdir()) == []


def test_a_seed_from_that_names_no_candidate_is_refused_before_any_is_scored(tmp_path, capsys):
    """The candidates' names follow from the options: an unknown one is refused before the folds are even loaded."""
    from tools.reduce_folds import main

    stage = tmp_path / "runs" / "x" / "stage1"
    for fold in (0, 1, 2):
        (stage / f"fold{fold}").mkdir(parents=True)  # no weights: loading them would fail next
    assert main([str(stage), "--seed-from", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --seed-from nonsense: not a single-model candidate of this reduction (fold0, fold1, fold2, "
                   "best, mean, top3, greedy), or best-single\n")  # fmt: skip
    assert main([str(stage), "--seed-from", "greedy+bn", "--strategies", "mean", "greedy"]) == 2
    assert "(fold0, fold1, fold2, mean, greedy)" in capsys.readouterr().err
    assert main([str(stage), "--seed-from", "top2+bn", "--k", "2", "--recalibrate", "4"]) == 2
    assert "fold 0 has no best weights" in capsys.readouterr().err  # accepted: the folds are loaded next
    assert main([str(stage), "--seed-from", "best+bn", "--recalibrate", "4"]) == 2  # best is one fold: no +bn
    assert "top3+bn, greedy+bn), or best-single" in capsys.readouterr().err


def test_a_reduction_on_another_pack_than_the_folds_trained_on_is_refused(tmp_path, capsys):
    """The selection set of another pack (or of the folds' own path, repacked since) may hold the folds'
    training images: refused naming both sha256s; the same pack anywhere else (a copy, a URL) is used."""
    import shutil

    from seg.data.manifest import manifest_sha256
    from seg.reduction.reduce import reduce_stage
    from tools.reduce_folds import main

    shards = selection_shards(tmp_path, train=8, val=1)
    trained = manifest_sha256(shards)
    identity = {"config": {}, "stage": 1, "init_from": {"path": None, "model": "scratch"},
                "data": {"manifest_sha256": trained}}  # fmt: skip
    stage = tmp_path / "runs" / "x" / "stage1"
    for fold in range(2):
        write_fold(stage, fold, small_model(fold).eval(), 0.3 + 0.1 * fold, identity, **{"data.shards": str(shards),
                   "data.eval_size": "null", "data.workers": "0", "wandb.mode": "disabled"})  # fmt: skip
    copy = shutil.copytree(shards, tmp_path / "copy")
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["groups"]["train-fold0"], manifest["groups"]["train-fold1"] = (
        manifest["groups"]["train-fold1"], manifest["groups"]["train-fold0"])  # fmt: skip
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(manifest))
    repacked = manifest_sha256(other)

    assert main([str(stage), "--shards", str(other)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --shards {other}: its manifest.json has sha256 {repacked}, but the folds trained on "
                   f"sha256 {trained} (their identity): another pack's selection set may hold their training images; "
                   "pass the pack they trained on as --shards (any copy or URL of it), or train the folds on "
                   "this one\n")  # fmt: skip
    (shards / "manifest.json").write_text(json.dumps(manifest))  # the folds' own path, repacked in place
    assert main([str(stage)]) == 2
    assert f"error: data.shards {shards} (the folds' own, repacked since): its manifest.json has sha256" in (
        capsys.readouterr().err
    )
    assert not (stage / "reduced").exists()

    report = reduce_stage(stage, shards=copy, strategies=("best",))  # the same pack elsewhere: by content
    assert report["shards"] == {"path": str(copy), "manifest_sha256": trained}


@pytest.mark.parametrize("written", [False, True])
def test_an_interrupted_reduction_says_whether_the_stage_was_reduced(tmp_path, monkeypatch, capsys, written):
    """Ctrl-C after reduced/ was replaced (while the summary run is logged) used to say nothing was reduced."""
    import tools.reduce_folds as tool

    stage = tmp_path / "stage1"
    (stage / "reduced").mkdir(parents=True)  # an earlier reduction

    def interrupted(stage_dir: str, *args: object, **kwargs: object) -> None:
        if written:  # replaced whole, as atomic_directory does: another folder renamed into place
            (stage / "new").mkdir()
            (stage / "reduced").rename(stage / "old")
            (stage / "new").rename(stage / "reduced")
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "reduce_stage", interrupted)
    assert tool.main([str(stage)]) == 130
    err = capsys.readouterr().err
    if written:
        assert err == (f"interrupted after {stage / 'reduced'} was written: the stage is reduced (its wandb or "
                       "tensorboard summary may be incomplete); exit 130\n")  # fmt: skip
    else:
        assert err == f"interrupted: {stage} not reduced (an earlier reduction is untouched); exit 130\n"


def test_reducing_a_stage_again_after_the_next_one_trained_warns_naming_its_folds(tmp_path, capsys):
    """Stage 2's fold 0 started from the greedy seed; reducing stage 1 again replaced it without a word."""
    from seg.reduction.lineage import model_digest
    from tools.reduce_folds import main

    _, stage = two_fold_stage(tmp_path)
    assert main([str(stage), "--strategies", "best"]) == 0
    seeded = model_digest(stage / "reduced" / "model.safetensors")
    fold0 = tmp_path / "runs" / "x" / "stage2" / "fold0"
    fold0.mkdir(parents=True)
    (fold0 / "summary.json").write_text(json.dumps({"identity": {"init_from": {"path": "p", "model": seeded}}}))
    assert main([str(stage), "--strategies", "best"]) == 0  # the same seed again: nothing to say
    assert "warning" not in capsys.readouterr().err
    assert main([str(stage), "--strategies", "mean"]) == 0
    now = model_digest(stage / "reduced" / "model.safetensors")
    assert capsys.readouterr().err == (
        f"warning: stage2's folds 0 started from the reduced model this reduction replaced ({seeded[:19]}), not from "
        f"{stage / 'reduced' / 'model.safetensors'} now ({now[:19]}): train them again from it (--init-from "
        f"{stage / 'reduced' / 'model.safetensors'}), or know that stage2 descends from the earlier reduction (the "
        "report names both)\n"
    )
