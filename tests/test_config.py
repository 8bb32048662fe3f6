"""Config values are checked up front: key, value, valid range, and where the value came from."""

from pathlib import Path

import pytest

from seg.config import ConfigError, load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


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
