"""seg's mmseg options against mmsegmentation's own code (1.2.2, a test extra): the same
parameter counts from mmseg's configs, and a converted mmseg checkpoint giving mmseg's logits."""

import importlib
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from seg.model.deeplab import from_config
from seg.model.weights import from_mmseg, load_model, load_state
from tests.test_model import MMSEG_PARAMETERS, FLOPS_512x1024
from tools.convert_mmseg import main as convert

REPO = Path(__file__).resolve().parents[1]
RECIPE = "deeplabv3plus/deeplabv3plus_r{depth}-d8_4xb2-80k_cityscapes-512x1024.py"


def _placeholder_ops() -> types.ModuleType:
    """mmcv-lite has no compiled ``mmcv.ops``; mmseg imports names from it for models that
    use them (not DeepLabV3+): a module whose every public name is an empty class."""
    ops = types.ModuleType("mmcv.ops")

    def placeholder(name: str) -> type:
        if name.startswith("_"):
            raise AttributeError(name)
        return type(name, (), {})

    ops.__getattr__ = placeholder  # type: ignore[method-assign]
    return ops


@pytest.fixture(scope="module")
def mmseg_model():
    """mmseg's builder for its DeepLabV3+ Cityscapes recipes, from the installed package's
    configs, with BN for SyncBN (one process) and no pretrained weights (no network)."""
    with pytest.MonkeyPatch.context() as patch:
        try:
            importlib.import_module("mmcv.ops")
        except ImportError:
            patch.setitem(sys.modules, "mmcv.ops", _placeholder_ops())
        mmseg = importlib.import_module("mmseg")
        from mmengine import Config
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules

        register_all_modules()
        configs = Path(mmseg.__file__).parent / ".mim" / "configs"

        def build(depth: int) -> torch.nn.Module:
            model = Config.fromfile(configs / RECIPE.format(depth=depth)).model
            model.pretrained, model.data_preprocessor = None, None
            for part in ("backbone", "decode_head", "auxiliary_head"):
                model[part].norm_cfg = {"type": "BN", "requires_grad": True}
            return MODELS.build(model)

        yield build


@pytest.mark.parametrize("depth", [50, 101])
def test_mmsegs_own_configs_count_the_parameters_pinned_for_seg(mmseg_model, depth):
    with torch.device("meta"):
        model = mmseg_model(depth)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (count(model) - count(model.auxiliary_head), count(model.auxiliary_head)) == MMSEG_PARAMETERS[depth]
    if depth == 50:  # and the forward's FLOPs at 512x1024, as seg's model counts them
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with torch.device("meta"), counter, torch.no_grad():
            model.eval().encode_decode(torch.empty(1, 3, 512, 1024), [{"img_shape": (512, 1024)}])
        assert counter.get_total_flops() == FLOPS_512x1024["mmseg_r50"]


def _randomise(model: torch.nn.Module) -> None:
    """Weights far from an init's symmetries: BN statistics and affines of every layer, and a
    classifier large enough that the logits differ by class and pixel."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.normal_(1, 0.2, generator=generator)
            module.bias.data.normal_(0, 0.1, generator=generator)
    for name, parameter in model.named_parameters():
        if name.endswith("conv_seg.weight"):
            parameter.data.normal_(0, 1, generator=generator)


def test_a_converted_mmseg_checkpoint_gives_mmsegs_logits(mmseg_model, tmp_path):
    theirs = mmseg_model(50)
    _randomise(theirs)
    theirs.eval()
    checkpoint = tmp_path / "deeplabv3plus_r50-d8.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": theirs.state_dict()}, checkpoint)

    out = tmp_path / "converted" / "model.safetensors"
    config = REPO / "configs" / "mmseg_r50.yaml"
    assert convert([str(checkpoint), "--config", str(config), "--out", str(out)]) == 0
    ours, sidecar = load_model(out)  # as tools/evaluate.py and tools/predict.py read it
    assert sidecar["converted_from"]["mmseg_checkpoint"] == checkpoint.name and sidecar["metrics"] == {}
    assert sidecar["config"]["model"]["head"] == "separable-aspp" and sidecar["format"] == "seg.deeplabv3plus"
    assert ours.aux_head is None  # inference weights: the auxiliary head left out

    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs.encode_decode(x, [{"img_shape": (64, 96)}] * 2)
        logits = ours(x)
    assert expected.std() > 1 and logits.shape == expected.shape == (2, 19, 64, 96)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)

    # the auxiliary head maps too (--with-aux keeps it, to train on)
    training = from_config(sidecar["config"]["model"], training=True).eval()
    load_state(training, from_mmseg(theirs.state_dict(), checkpoint, aux=True), checkpoint)
    with torch.no_grad():
        aux_expected = theirs.auxiliary_head(theirs.extract_feat(x))
        aux = training.aux_head(training.backbone.features(x)[1])
    torch.testing.assert_close(aux, aux_expected, rtol=1e-4, atol=1e-4)


def test_checkpoints_that_do_not_fit_are_refused_in_one_line_naming_the_file(mmseg_model, tmp_path, capsys):
    state = mmseg_model(50).state_dict()
    checkpoint = tmp_path / "r50.pth"
    torch.save({"state_dict": state}, checkpoint)
    r101 = REPO / "configs" / "mmseg_r101.yaml"
    assert convert([str(checkpoint), "--config", str(r101), "--out", str(tmp_path / "m.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(checkpoint) in error and "missing" in error and "layer3.6" in error
    assert not (tmp_path / "m.safetensors").exists()

    torch.save({"state_dict": {**state, "decode_head.psp_modules.0.1.conv.weight": torch.zeros(1)}}, checkpoint)
    r50 = REPO / "configs" / "mmseg_r50.yaml"
    assert convert([str(checkpoint), "--config", str(r50), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert re.search(
        r"decode_head.psp_modules.0.1.conv.weight is not a key of mmseg's DeepLabV3\+", capsys.readouterr().err
    )

    no_aux = tmp_path / "no_aux.yaml"
    no_aux.write_text(r50.read_text().replace("aux_head: true", "aux_head: false"))
    arguments = [str(checkpoint), "--config", str(no_aux), "--out", str(tmp_path / "m.safetensors"), "--with-aux"]
    assert convert(arguments) == 2
    assert "has model.aux_head false; set model.aux_head=true" in capsys.readouterr().err
