import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from seg.model import DeepLabV3Plus, ResNet, count_parameters
from seg.weights import WeightsError, load_backbone

# The study's model (ResNet-34 layout, OS 8, ASPP 12/24/36, 19 classes): the README's number.
STUDY_PARAMETERS = 26_715_827


def test_the_study_model_has_its_parameter_count_and_layout():
    model = DeepLabV3Plus(depth=34, output_stride=8)
    assert count_parameters(model) == STUDY_PARAMETERS
    backbone = model.backbone
    assert [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    for layer, dilation in ((backbone.layer3, 2), (backbone.layer4, 4)):
        for block in layer:
            assert block.conv2.dilation == (dilation, dilation) and block.conv2.stride == (1, 1)
    rates = [branch[0].dilation[0] for branch in model.aspp.branches[1:]]
    assert rates == [12, 24, 36]
    assert model.reduce[0].out_channels == 48
    assert model.aspp.project[1].p == 0.5
    assert model.classifier.out_channels == 19


@pytest.mark.parametrize(("depth", "output_stride"), [(18, 8), (34, 16), (50, 8), (101, 16)])
def test_every_depth_and_output_stride_maps_the_input_to_19_logits(depth, output_stride):
    model = DeepLabV3Plus(depth, output_stride).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        low, high = model.backbone(x)
        assert high.shape[2:] == (64 // output_stride, 96 // output_stride)
        assert low.shape[2:] == (16, 24)
        assert model(x).shape == (1, 19, 64, 96)


def test_kaiming_fan_out_init_and_unit_batch_norm():
    torch.manual_seed(0)
    model = DeepLabV3Plus(18, 8)
    conv = model.backbone.layer3[0].conv1  # 256 x 128 x 3 x 3: fan_out = 256 * 9
    expected_std = (2.0 / (256 * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.05
    bn = model.backbone.layer3[0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_batch_one_per_device_trains_without_image_pooling_norm():
    x, target = torch.randn(1, 3, 64, 64), torch.randint(0, 19, (1, 64, 64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        DeepLabV3Plus(18, 8).train()(x)
    model = DeepLabV3Plus(18, 8, aspp_pool_norm=False).train()
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    assert model.aspp.pool.project[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_under_autocast_and_channels_last(dtype):
    model = DeepLabV3Plus(18, 8).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    out.float().mean().backward()
    assert torch.isfinite(model.backbone.conv1.weight.grad).all()


def torchvision_layout(depth: int) -> dict[str, torch.Tensor]:
    """Weights named as torchvision's ``resnet{depth}().state_dict()``: ResNet keys plus ``fc``."""
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in ResNet(depth).state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, ResNet(depth).out_channels), torch.randn(1000)
    return state


def test_torchvision_key_layout():
    keys = ResNet(34).state_dict()
    assert keys["conv1.weight"].shape == (64, 3, 7, 7)
    assert keys["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert keys["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert keys["layer2.0.downsample.1.running_var"].shape == (128,)
    assert keys["layer4.2.bn2.num_batches_tracked"].shape == ()
    keys50 = ResNet(50).state_dict()
    assert keys50["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert keys50["layer3.5.bn3.weight"].shape == (1024,) and "layer3.6.bn3.weight" not in keys50
    assert ResNet(101).state_dict()["layer3.22.bn3.weight"].shape == (1024,)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_imagenet_weights_load_from_a_local_file_and_report_keys(tmp_path, suffix):
    state = torchvision_layout(34)
    path = tmp_path / f"resnet34{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    model = DeepLabV3Plus(34, 8)
    missing, unexpected = load_backbone(model, path)
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.backbone.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])

    del state["layer4.2.bn2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    missing, _ = load_backbone(DeepLabV3Plus(34, 8), tmp_path / "partial.pth")
    assert missing == ["layer4.2.bn2.weight"]


def test_weights_of_another_depth_are_refused_naming_the_key(tmp_path):
    torch.save(torchvision_layout(50), tmp_path / "resnet50.pth")
    message = r"layer1.0.conv1.weight has shape \(64, 64, 1, 1\), the depth-34 backbone needs \(64, 64, 3, 3\)"
    with pytest.raises(WeightsError, match=message):
        load_backbone(DeepLabV3Plus(34, 8), tmp_path / "resnet50.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_backbone(DeepLabV3Plus(34, 8), tmp_path / "junk.pth")


def test_init_from_weights_that_do_not_fit_names_the_file_the_keys_with_shapes_and_the_cause(tmp_path):
    from seg.weights import load_weights

    deeper = DeepLabV3Plus(34, 16)
    path = tmp_path / "depth34.safetensors"
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(path))
    with pytest.raises(WeightsError) as error:
        load_weights(DeepLabV3Plus(18, 16), path, {"depth": 18, "aspp_pool_norm": True})
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert re.search(r"unexpected 96, e.g. backbone.layer1.2.\w+.\w+ \(64,( 64, 3, 3)?\)", message)
    assert "another ResNet depth: set model.depth" in message
    torchvision_layout = tmp_path / "resnet34.safetensors"
    backbone = {k.removeprefix("backbone."): v.contiguous() for k, v in deeper.state_dict().items() if "backbone" in k}
    save_file(backbone, str(torchvision_layout))
    with pytest.raises(
        WeightsError, match=r"missing \d+, e.g. backbone.conv1.weight \(64, 3, 7, 7\).*model.pretrained"
    ):
        load_weights(DeepLabV3Plus(34, 16), torchvision_layout)
    load_weights(DeepLabV3Plus(34, 8), path)  # another output stride has the same weights
