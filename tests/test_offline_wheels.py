"""tools/offline_wheels.py: the wheels a machine without an index lacks, walked from seg's
requirements without pip's all-or-nothing resolver (which would fetch torch again)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tools.offline_wheels import collect, have_versions, main, seg_requirements

# a fake index: name -> {version: requirements}
INDEX = {
    "alpha": {"1.0": ["gamma>=1", "delta", 'old; python_version < "3.8"', 'fancy; extra == "x"']},
    "beta": {"2.0": ["gamma<2"]},
    "gamma": {"1.5": [], "2.1": ["epsilon"]},
    "epsilon": {"1.0": []},
}


def fake_fetch(requirement: Requirement, dest: Path, python_version: str) -> Path | None:
    versions = [v for v in INDEX.get(requirement.name, {}) if requirement.specifier.contains(v)]
    if not versions:
        return None
    version = max(versions, key=Version)
    wheel = dest / f"{requirement.name}-{version}-py3-none-any.whl"
    metadata = "".join(f"Requires-Dist: {r}\n" for r in INDEX[requirement.name][version])
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{requirement.name}-{version}.dist-info/METADATA", f"Name: {requirement.name}\n{metadata}")
    return wheel


def test_the_walk_leaves_out_what_the_target_has_and_settles_a_disagreement(tmp_path: Path):
    roots = [Requirement("alpha"), Requirement("beta"), Requirement("torch>=2")]
    wheels, problems = collect({"torch": None, "delta": None}, tmp_path, "3.12", roots, fake_fetch)
    assert problems == []
    # gamma 2.1 first (alpha's >=1), then beta's <2 took gamma 1.5 in its place; 2.1's epsilon stays
    assert {name: path.name for name, path in wheels.items()} == {
        "alpha": "alpha-1.0-py3-none-any.whl",
        "beta": "beta-2.0-py3-none-any.whl",
        "gamma": "gamma-1.5-py3-none-any.whl",
        "epsilon": "epsilon-1.0-py3-none-any.whl",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in wheels.values())


def test_a_version_the_target_has_that_a_requirement_refuses_gets_a_wheel_that_fits(tmp_path: Path):
    """pip freeze's versions are checked: the target's gamma 2.1 is too new for beta."""
    have = {"gamma": Version("2.1"), "epsilon": Version("1.0")}
    wheels, problems = collect(have, tmp_path, "3.12", [Requirement("beta")], fake_fetch)
    assert problems == [] and sorted(wheels) == ["beta", "gamma"] and wheels["gamma"].name.startswith("gamma-1.5-")
    wheels, _ = collect({"gamma": Version("1.2")}, tmp_path / "fits", "3.12", [Requirement("beta")], fake_fetch)
    assert sorted(wheels) == ["beta"]


def test_a_requirement_without_a_wheel_is_named_with_who_needs_it(tmp_path: Path):
    roots = [Requirement("alpha"), Requirement("gamma>=3")]
    _, problems = collect({}, tmp_path, "3.12", roots, fake_fetch)
    assert problems == [
        "delta (needed by alpha): no wheel for CPython 3.12 on Linux x86-64",
        "gamma>=1,>=3 (needed by alpha, seg): no wheel for CPython 3.12 on Linux x86-64",
    ]


def test_seg_s_requirements_come_from_setup_cfg_and_have_reads_pip_freeze(tmp_path: Path):
    names = {r.name for r in seg_requirements()}
    assert {"torch", "webdataset", "accelerate", "wandb"} <= names
    have = tmp_path / "have.txt"
    have.write_text("# pip freeze\nTorch==2.11.0\nmy_pkg @ file:///x\nnumpy\n\n")
    assert have_versions(have) == {"torch": Version("2.11.0"), "my-pkg": None, "numpy": None}
    have.write_text("not a name!\n")
    with pytest.raises(SystemExit, match="'not a name!' is neither"):
        have_versions(have)


def test_bad_arguments_are_refused_with_what_to_give(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--have", str(tmp_path / "none.txt"), "--dest", str(tmp_path / "w")]) == 2
    assert "pip freeze > have.txt" in capsys.readouterr().err
    have = tmp_path / "have.txt"
    have.write_text("torch\n")
    assert main(["--have", str(have), "--dest", str(tmp_path / "w"), "--python-version", "3"]) == 2
    assert "--python-version '3': major.minor, e.g. 3.12" in capsys.readouterr().err
    assert main(["--have", str(have), "--dest", str(have)]) == 2
    assert f"--dest {have}: a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
