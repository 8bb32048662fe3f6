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
