"""seg/recipe/identity.py: how two runs' identities differ."""

from seg.recipe.identity import differences, experiment_key


def test_a_config_key_a_run_recorded_before_it_existed_counts_as_its_default():
    """A fold trained before model.stem existed is the same run as one with the default stem,
    and another run than one with a deep stem."""
    old = {"config": {"model": {"depth": 50}}, "batch": {"global": 8}}
    assert differences(old, {"config": {"model": {"depth": 50, "stem": "torchvision"}}, "batch": {"global": 8}}) == []
    assert differences(old, {"config": {"model": {"depth": 50, "stem": "deep"}}, "batch": {"global": 8}}) == [
        "config.model.stem: 'torchvision' -> 'deep'"
    ]
    # a key the schema does not know is still named as absent
    assert "data.x: 1 -> '(absent)'" in differences({"data": {"x": 1}}, {"data": {"y": 2}})


def test_the_experiment_key_ignores_what_a_resume_may_change():
    one = {"config": {"optim": {"lr": 0.1}}, "batch": {"processes": 1, "per_process": 4, "global": 4}, "code": "a"}
    two = {"config": {"optim": {"lr": 0.1}}, "batch": {"processes": 2, "per_process": 2, "global": 4}, "code": "b"}
    assert experiment_key(one) == experiment_key(two)
    assert experiment_key(one) != experiment_key({**one, "config": {"optim": {"lr": 0.2}}})


def test_another_folds_state_is_another_run_and_an_identity_recorded_before_folds_were_is_not_refused(tmp_path):
    """`--fold 1 --resume runs/.../fold0/checkpoints/step-8` resumed fold 0's model as fold 1's, and
    its scores on fold 0's held-out images as fold 1's, whenever the two folds' schedules matched."""
    from omegaconf import OmegaConf

    from seg.data.manifest import FoldSplit
    from seg.recipe.config import load_config
    from seg.recipe.identity import FOLDS_MAY_DIFFER, fold_identity, stage_identity
    from tests.tiny_training import REPO, TINY, tiny_shards

    shards = tiny_shards(tmp_path)
    config = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={shards}", *TINY], 1)
    zero, one = (fold_identity(config, 1, FoldSplit.of(str(shards), k), None, 1) for k in (0, 1))
    assert (zero["fold"], one["fold"]) == (0, 1)
    assert "fold: 0 -> 1" in differences(zero, one)
    assert stage_identity(zero) == stage_identity(one) and "fold" in FOLDS_MAY_DIFFER  # one stage, both folds
    before = {k: v for k, v in zero.items() if k != "fold"}  # recorded by a seg without the entry
    assert differences(before, zero) == [] and not any(c.startswith("fold") for c in differences(before, one))
    assert OmegaConf.is_config(config)


def test_an_epochs_run_takes_whole_optimizer_steps_and_none_when_the_accumulation_outlasts_it():
    """The micro-batches after the last whole accumulation were computed and thrown away."""
    from omegaconf import OmegaConf

    from seg.recipe.identity import total_steps

    def config(epochs: int, accum: int, iters: int | None = None):
        return OmegaConf.create({"train": {"epochs": epochs, "grad_accum": accum, "iters": iters}})

    assert total_steps(config(2, 1), 7) == 14
    assert total_steps(config(2, 4), 7) == 12  # 3 optimizer steps; 2 micro-batches would make none
    assert total_steps(config(1, 100), 7) == 0  # train.py refuses it (seg.training.refusals.no_optimizer_step)
    assert total_steps(config(2, 4, iters=5), 7) == 20


def test_a_manifest_missing_an_entry_is_refused_at_the_first_read_naming_it(tmp_path):
    """The run reads the manifest once, for its identity: what it lacks is said there, in one line."""
    import argparse
    import json

    from seg.recipe.config import load_config
    from seg.training.refusals import planned_identity
    from tests.tiny_training import REPO, tiny_shards

    shards = tiny_shards(tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["groups"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    config = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={shards}"], 1)
    identity, split, error = planned_identity(argparse.Namespace(fold=0, stage=1, init_from=None), config)
    assert (identity, split) == (None, None)
    assert error == f"{shards}: its manifest has no 'groups' entry: repack it (tools/pack_cityscapes.py)"
