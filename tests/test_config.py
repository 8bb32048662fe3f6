"""Config values are checked up front: key, value, valid range, and where the value came from."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from seg.core.cli import Size
from seg.data.manifest import FoldSplit
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from seg.recipe.config import ConfigError, load_config, resolve_auto
from seg.recipe.identity import fold_identity
from seg.train import main

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
STUDY = DEMO.with_name("study.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.eval_every=0", r"'train.eval_every' \(on the command line\): 0 is out of range; valid: value >= 1"),
        ("train.log_every=0", r"'train.log_every' .*: 0 is out of range; valid: value >= 1"),
        ("train.batch_size=0", r"'train.batch_size' .*: 0 is out of range"),
        ("train.save_every=0", r"'train.save_every' .*: 0 is out of range"),
        ("optim.lr=-0.1", r"'optim.lr' .*: -0.1 is out of range; valid: value > 0"),
        ("optim.weight_decay=-1", r"'optim.weight_decay' .*: -1.0 is out of range; valid: value >= 0"),
        ("loss.alpha=1.5", r"'loss.alpha' .*: 1.5 is out of range; valid: 0 <= value <= 1"),
        ("loss.label_smoothing=1.0", r"'loss.label_smoothing' .*: 1.0 is out of range; valid: 0 <= value < 1"),
        ("data.workers=-1", r"'data.workers' .*: -1 is out of range; valid: value >= 0"),
        ("train.ema_decay=1.0", r"'train.ema_decay' .*: 1.0 is out of range; valid: 0 < value < 1"),
        ("schedule.warmup_iters=-3", r"'schedule.warmup_iters' .*: -3 is out of range"),
        ("train.experiment=../../etc", r"'train.experiment' \(on the command line\): '../../etc' is not a folder name"),
        ("train.experiment=a/b", r"'train.experiment' .*: 'a/b' is not a folder name: name the experiment without '/'"),
        ("train.experiment=", r"'train.experiment' on the command line: no value after '=' \(null for none\)"),
        ("data=5", r"'data' on the command line: a section, not a value; set its keys, e.g. data.shards=\.\.\."),
        (
            "tracking.backends=wandb",
            r"'tracking.backends' on the command line: 'wandb' is not a list; write "
            r"tracking.backends=\[a,b\]",
        ),
    ],
)
def test_out_of_range_values_are_refused_with_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_an_error_says_whether_the_file_or_the_command_line_gave_the_value(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.epoch' on the command line: Key 'epoch' not in"):
        load_config(DEMO, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"'train.batch_size' on the command line: Value 'x'"):
        load_config(DEMO, ["train.batch_size=x"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  shards: x\ntrain:\n  log_every: 0\n")
    with pytest.raises(ConfigError, match=rf"'train.log_every' \(in {bad}\): 0 is out of range"):
        load_config(bad)
    assert load_config(DEMO, ["train.save_every=5", "train.ema_decay=null"]).train.save_every == 5


def test_the_shipped_configs_are_in_range():
    for path in DEMO.parent.glob("*.yaml"):
        load_config(path, ["data.shards=x"], stage=1)


# --- base configs (mmseg's _base_) ---------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_chain_of_bases_merges_base_first_and_the_command_line_wins(tmp_path):
    # bases/root.yaml <- bases/mid.yaml (and extra.yaml, merged after it) <- child.yaml, each
    # path relative to the file that names it
    write(tmp_path / "bases" / "root.yaml", "data:\n  shards: root\n  size: [64, 128]\noptim:\n  lr: 0.5\n"
          "train:\n  epochs: 7\nstages:\n  - {}\n  - {optim.lr: 0.1}\n  - {optim.lr: 0.01}\n")  # fmt: skip
    write(tmp_path / "bases" / "mid.yaml", "_base_: root.yaml\noptim:\n  name: sgd\ntrain:\n  epochs: 5\n")
    write(tmp_path / "extra.yaml", "model:\n  depth: 50\ntrain:\n  epochs: 4\n")
    child = write(tmp_path / "child.yaml", "_base_: [bases/mid.yaml, extra.yaml]\ntrain:\n  batch_size: 3\n"
                  "stages:\n  - {}\n  - {optim.lr: 0.2}\n")  # fmt: skip
    config = load_config(child)
    assert (config.data.shards, list(config.data.size), config.optim.lr) == ("root", [64, 128], 0.5)  # root's
    assert (config.optim.name, config.model.depth, config.train.epochs) == ("sgd", 50, 4)  # mid's, extra's last
    assert config.train.batch_size == 3 and "_base_" not in config
    # the child's stages replace the base's whole list (OmegaConf's list merge), as in mmseg
    assert [dict(s) for s in config.stages] == [{}, {"optim.lr": 0.2}]
    assert load_config(child, [], stage=3).optim.lr == 0.2  # beyond the child's list: its last entry
    overridden = load_config(child, ["train.epochs=9", "optim.lr=0.3"], stage=2)
    assert (overridden.train.epochs, overridden.optim.lr) == (9, 0.3)


def test_a_cycle_of_bases_is_refused_naming_the_files(tmp_path):
    a = write(tmp_path / "a.yaml", "_base_: b.yaml\ndata:\n  shards: x\n")
    b = write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError) as refused:
        load_config(a)
    message = str(refused.value)
    assert message == f"config files extend each other in a cycle: {a} -> {b} -> {a} (remove one _base_)"
    write(tmp_path / "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*self\.yaml -> .*self\.yaml"):
        load_config(tmp_path / "self.yaml")


def test_a_missing_or_malformed_base_is_refused_naming_it_and_the_file_that_names_it(tmp_path):
    child = write(tmp_path / "child.yaml", "_base_: [base.yaml, gone.yaml]\n")
    write(tmp_path / "base.yaml", "data:\n  shards: x\n")
    with pytest.raises(ConfigError, match=rf"^config file {tmp_path / 'gone.yaml'} \(a _base_ of {child}\) not found$"):
        load_config(child)
    write(tmp_path / "child.yaml", "_base_: {file: base.yaml}\n")
    with pytest.raises(ConfigError, match=rf"'_base_' in {child}: .* is not a file name or a list of file names"):
        load_config(child)
    write(tmp_path / "base.yaml", "data: [unclosed\n")
    write(tmp_path / "child.yaml", "_base_: base.yaml\n")
    base = tmp_path / "base.yaml"
    with pytest.raises(ConfigError, match=rf"config file {base} \(a _base_ of {child}\) is not readable YAML"):
        load_config(child)


def test_a_bad_key_or_value_in_a_base_is_refused_naming_the_key_and_that_file(tmp_path):
    base = write(tmp_path / "base.yaml", "data:\n  shards: x\ntrain:\n  epoch: 3\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=rf"^config key 'train.epoch' in {base}: Key 'epoch' not in"):
        load_config(child)
    write(tmp_path / "base.yaml", "data:\n  shards: x\ntrain:\n  log_every: 0\n")
    with pytest.raises(ConfigError, match=rf"'train.log_every' \(in {base}\): 0 is out of range"):
        load_config(child)
    write(tmp_path / "child.yaml", "_base_: base.yaml\ntrain:\n  log_every: -1\n")  # the child's value is the one kept
    with pytest.raises(ConfigError, match=rf"'train.log_every' \(in {child}\): -1 is out of range"):
        load_config(child)
    write(tmp_path / "base.yaml", "data:\n  shards: x\nstages:\n  - {}\n  - {train.log_every: 0}\n")
    with pytest.raises(ConfigError, match=rf"'train.log_every' \(in stages\[1\] of {base}\): 0 is out of range"):
        load_config(tmp_path / "base.yaml", [], stage=2)
    with pytest.raises(ConfigError, match=r"'optim.lr' \(on the command line\): 0.0 is out of range"):
        load_config(child, ["optim.lr=0"])
    with pytest.raises(ConfigError, match=r"'train.log_every' \(in stages\[1\] of "):
        load_config(child, [], stage=2)  # the child's own value, then its base's stage entry


def test_the_r101_recipe_extends_the_r50_one_stating_only_what_differs():
    r50, r101 = DEMO.parent / "mmseg_r50.yaml", DEMO.parent / "mmseg_r101.yaml"
    assert "_base_: mmseg_r50.yaml" in r101.read_text()
    a, b = OmegaConf.to_container(load_config(r50)), OmegaConf.to_container(load_config(r101))
    assert b["model"]["depth"] == 101 and b["train"]["experiment"] == "mmseg-r101"
    for section, key in [("model", "depth"), ("model", "pretrained"), ("train", "experiment")]:
        a[section].pop(key), b[section].pop(key)
    assert a == b  # as the two files were before r101 had a base: the same recipe but for these


def test_a_based_config_is_the_same_run_as_its_flattened_copy(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    make_synthetic(root, counts={"train": 6, "val": 2, "test": 0}, cities={"train": 2, "val": 1, "test": 1},
                   size=Size(32, 64), progress=False)  # fmt: skip
    pack(root, tmp_path / "shards", Options(folds=2, splits=("train", "val")), progress=False)
    write(tmp_path / "base.yaml", f"_base_: {DEMO}\ndata:\n  shards: {tmp_path / 'shards'}\noptim:\n  lr: 0.02\n")
    based = write(tmp_path / "based.yaml", "_base_: base.yaml\nmodel:\n  depth: 34\n")
    # the same config written out in one file, as a user would flatten it by hand
    flattened = yaml.safe_load(DEMO.read_text())
    flattened["data"]["shards"], flattened["optim"]["lr"] = str(tmp_path / "shards"), 0.02
    flattened["model"]["depth"] = 34
    flat = write(tmp_path / "flat.yaml", yaml.safe_dump(flattened))
    for stage in (1, 2):  # stage 2 applies demo.yaml's stages entry (optim.lr: 3.0e-4) to both
        a, b = load_config(based, [], stage), load_config(flat, [], stage)
        assert OmegaConf.to_yaml(a) == OmegaConf.to_yaml(b)  # what config.yaml holds
        split = FoldSplit.of(a.data.shards, 0)
        assert fold_identity(a, stage, split, None, 1) == fold_identity(b, stage, split, None, 1)
    # seg/train.py refuses a cycle in one line, exit 2, as any config error
    write(tmp_path / "base.yaml", "_base_: based.yaml\n")
    assert main(["--config", str(based), "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config files extend each other in a cycle") and err.count("\n") == 1


def test_precision_no_as_the_readme_writes_it_is_no_mixed_precision(tmp_path):
    """YAML 1.1 reads an unquoted `no` as false; `train.precision=no` (and `precision: no` in a
    file) mean accelerate's "no", not a refusal of 'False'."""
    assert load_config(DEMO, ["train.precision=no"]).train.precision == "no"
    config = tmp_path / "x.yaml"
    config.write_text("data: {shards: s}\ntrain: {precision: no}\n")
    assert load_config(config, []).train.precision == "no"
    with pytest.raises(ConfigError, match="'True' is not one of no, bf16, fp16"):
        load_config(config, ["train.precision=yes"])


# --- auto values: chosen for the machine, the loader workers fixed at a run's first start --------


def test_workers_and_channels_last_default_to_auto_and_refuse_other_words(tmp_path):
    config = load_config(DEMO, ["data.workers=auto"])
    assert config.data.workers == "auto" and config.data.channels_last == "auto"
    assert load_config(DEMO, ["data.workers=3", "data.channels_last=true"]).data.workers == 3
    with pytest.raises(ConfigError, match=r"'data.workers' \(on the command line\): 'many' is not auto or a number"):
        load_config(DEMO, ["data.workers=many"])
    with pytest.raises(ConfigError, match=r"'data.channels_last' \(on the command line\): 'fast' is not auto or true"):
        load_config(DEMO, ["data.channels_last=fast"])
    with pytest.raises(ConfigError, match=r"'data.workers' .*: -1 is out of range"):
        load_config(DEMO, ["data.workers=-1"])


def test_resolve_auto_takes_the_recorded_workers_then_the_machine_s_and_channels_last_with_cuda(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    config = load_config(DEMO, ["data.workers=auto"])
    fresh = resolve_auto(config, cuda=False)
    assert (fresh.data.workers, fresh.data.channels_last) == (6, False)
    assert OmegaConf.is_readonly(fresh) and config.data.workers == "auto"  # a copy; the loaded config as it was
    recorded = resolve_auto(config, cuda=True, recorded_workers=2)
    assert recorded.data == {**fresh.data, "workers": 2, "channels_last": True}
    explicit = load_config(DEMO, ["data.workers=5", "data.channels_last=false"])
    assert resolve_auto(explicit, cuda=True, recorded_workers=2).data.workers == 5  # a number is kept, as always
    assert resolve_auto(explicit, cuda=True).data.channels_last is False


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.weight_decay=inf", "schedule.power=inf",
                                      "optim.clip_grad_norm=inf", "model.aux_weight=-inf"])  # fmt: skip
def test_an_infinite_value_is_out_of_every_range(override):
    """optim.lr=inf was taken, and the run failed at step 1 blaming the loss."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"^config key '{key}' \\(on the command line\\): -?inf is out of range"):
        load_config(DEMO, [override], 1)


def test_an_early_stop_that_comes_before_a_step_at_the_lowered_plateau_rate_is_refused():
    """The study's plateau_patience 5 dropped the rate at the 6th evaluation without a better mIoU,
    and early_stop_patience 6 stopped the fold at that same evaluation: the rate never dropped."""
    with pytest.raises(ConfigError, match=(
        r"^config key 'train.early_stop_patience' \(on the command line\): 6 stops the run before a step at a "
        r"plateau-lowered rate \(schedule.plateau_patience 5: the rate drops at evaluation 6 in a row without a "
        r"better mIoU\); set it above 6, or lower schedule.plateau_patience$")):  # fmt: skip
        load_config(STUDY, ["schedule.plateau_patience=5", "train.early_stop_patience=6"], 1)
    study = load_config(STUDY, [], 1)  # the study's: halved at 5, stopped at 6
    assert (study.schedule.plateau_patience, study.train.early_stop_patience) == (4, 6)
    # a later stage on another schedule has no plateau to wait for
    assert load_config(STUDY, ["train.early_stop_patience=2"], 4).schedule.name == "cosine"


def test_a_training_size_lying_the_other_way_than_the_evaluation_or_base_size_is_refused_naming_the_swap():
    """data.size=[192,96] trained portrait crops of landscape frames without a word; and the hint for
    data.size=1024x512 said [a,b], never which way round."""
    with pytest.raises(ConfigError, match=(
        r"^config key 'data.size' \(on the command line\): \[192, 96\] is \[height, width\]: 96 wide, 192 high, "
        r"portrait, but data.eval_size \[96, 192\] is landscape; did you mean \[96, 192\]\?$")):  # fmt: skip
        load_config(DEMO, ["data.size=[192,96]"], 1)
    with pytest.raises(ConfigError, match=r"but data.base_size \[1024, 2048\] is landscape; did you mean \[32, 64\]"):
        load_config(DEMO, ["data.size=[64,32]", "data.eval_size=null"], 1)
    assert list(load_config(DEMO, ["data.size=[64,64]"], 1).data.size) == [64, 64]  # square: either way
    with pytest.raises(ConfigError, match=r"'1024x512' is not a list; write data.size=\[height,width\]$"):
        load_config(DEMO, ["data.size=1024x512"], 1)


def test_a_training_size_lying_the_other_way_than_shards_packed_at_a_size_is_refused():
    from types import SimpleNamespace

    from seg.training.refusals import size_against_shards

    split = SimpleNamespace(manifest={"options": {"resize": {"height": 512, "width": 1024}}})
    config = load_config(STUDY, ["data.size=[1024,512]", "data.eval_size=[1024,512]", "data.base_size=[2048,1024]"], 1)
    assert size_against_shards(config, split) == (
        "config key 'data.size': [1024, 512] is [height, width]: 512 wide, 1024 high, portrait, but the shards' "
        "frame size (1024x512, packed with --resize) is landscape; did you mean [512, 1024]?"
    )
    assert size_against_shards(load_config(STUDY, [], 1), split) is None
    assert size_against_shards(config, SimpleNamespace(manifest={"options": {"resize": None}})) is None


def test_stages_on_the_command_line_are_refused_and_a_per_stage_value_replaced_there_is_named():
    """stages=[{},{optim.lr: 0.5}] was recorded in config.yaml and never applied (a stage's entry comes
    first); optim.lr=2e-4 flattened the study's per-stage rates without a word."""
    from seg.recipe.config import stage_values_overridden

    for override in ("stages=[{},{optim.lr: 0.5}]", "stages.1={optim.lr: 0.5}"):
        with pytest.raises(ConfigError, match=r"^config key 'stages(.1)?' on the command line: a stage's entries are"):
            load_config(DEMO, [override], 2)
    study = load_config(STUDY, ["optim.lr=2e-4"])
    assert stage_values_overridden(study, ["optim.lr=2e-4"], 2) == ["optim.lr=2e-4 replaces stages[1]'s 5e-05"]
    assert stage_values_overridden(study, ["optim.lr=2e-4"], 1) == []


def test_an_epoch_sized_eval_every_under_train_iters_is_warned_of():
    """The study with train.iters=80000 kept eval_every 1: an evaluation (and a state) every iteration."""
    from seg.training.loop import evaluations_warning

    study = load_config(STUDY, ["train.iters=80000"], 1)
    assert evaluations_warning(study.train, 80000) == (
        "train.eval_every 1 counts iterations when train.iters is set: 80000 evaluations, a state saved at each; "
        "set train.eval_every (mmseg's val_interval, e.g. 8000)"
    )
    assert (
        evaluations_warning(load_config(STUDY, ["train.iters=80000", "train.eval_every=8000"], 1).train, 80000) is None
    )
    assert evaluations_warning(load_config(STUDY, [], 1).train, 10**6) is None  # epochs: eval_every counts epochs


def test_a_list_for_a_key_of_named_choices_names_the_choices():
    """loss.class_weights=[1,2,3] said only: Cannot convert 'ListConfig' to string."""
    with pytest.raises(ConfigError, match=(r"^config key 'loss.class_weights' on the command line: \[1,2,3\] is not "
                                           r"one of null, inverse, inverse-sqrt, log$")):  # fmt: skip
        load_config(DEMO, ["loss.class_weights=[1,2,3]"], 1)
