import hashlib
import io
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from seg.model.deeplab import DeepLabV3Plus, ResNet, count_parameters, from_config
from seg.model.weights import WeightsError, load_backbone
from seg.recipe.config import ConfigError, load_config

# The study's model (ResNet-34 layout, OS 8, ASPP 12/24/36, 19 classes): the README's number.
STUDY_PARAMETERS = 26_715_827
# mmseg's deeplabv3plus_r{50,101}-d8_4xb2-80k_cityscapes-512x1024 models: (without, of) the
# auxiliary head, counted by building mmsegmentation 1.2.2's own configs with its own code
# (sum of parameter numel; tests/test_mmseg.py counts them again from the installed package).
MMSEG_PARAMETERS = {50: (41_225_187, 2_364_691), 101: (60_217_315, 2_364_691)}
# Forward FLOPs of one 512x1024 image (torch's FlopCounterMode, eval mode): the study's model
# as before mmseg's options were added, and mmseg's R50-D8 as its own encode_decode counts.
FLOPS_512x1024 = {"study": 512_208_666_624, "mmseg_r50": 704_631_537_664}


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


def torch_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_weights_of_another_depth_are_refused_naming_the_key(tmp_path):
    torch.save(torchvision_layout(50), tmp_path / "resnet50.pth")
    message = r"layer1.0.conv1.weight has shape \(64, 64, 1, 1\), the depth-34 backbone needs \(64, 64, 3, 3\)"
    with pytest.raises(WeightsError, match=message):
        load_backbone(DeepLabV3Plus(34, 8), tmp_path / "resnet50.pth")
    # a file of another kind (a config passed as --init-from, say) and a torch file that breaks:
    # one line each, the way out named, none of torch's lines of advice
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk.pth: not a weights file; pass a .safetensors model, or a torch"):
        load_backbone(DeepLabV3Plus(34, 8), tmp_path / "junk.pth")
    (tmp_path / "broken.pth").write_bytes(torch_bytes({"x": torch.zeros(2)})[:40])
    with pytest.raises(WeightsError, match=r"broken.pth: cannot read weights \(.+\); pass a .safetensors") as e:
        load_backbone(DeepLabV3Plus(34, 8), tmp_path / "broken.pth")
    assert "\n" not in str(e.value)


def test_init_from_weights_that_do_not_fit_names_the_file_the_keys_with_shapes_and_the_cause(tmp_path):
    from seg.model.weights import load_weights

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


def _study_forward(model: DeepLabV3Plus, x: torch.Tensor) -> torch.Tensor:
    """The study model's forward as it was before mmseg's options (torchvision stem, ASPP
    then decoder, no dropout before the classifier)."""
    b = model.backbone
    low = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
    high = model.aspp(b.layer4(b.layer3(b.layer2(low))))
    high = nn.functional.interpolate(high, size=low.shape[2:], mode="bilinear", align_corners=False)
    out = model.decoder(torch.cat([high, model.reduce(low)], dim=1))
    return nn.functional.interpolate(model.classifier(out), size=x.shape[2:], mode="bilinear", align_corners=False)


def test_the_default_model_is_the_study_model_without_any_mmseg_part():
    torch.manual_seed(0)
    model = from_config(load_config(None, ["data.shards=x"]).model, training=True).eval()
    assert count_parameters(model) == STUDY_PARAMETERS and model.aux_head is None
    assert not any(k.startswith(("backbone.stem", "aux_head")) for k in model.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), _study_forward(model, x))
    model.train()
    assert isinstance(model(torch.randn(2, 3, 64, 96)), torch.Tensor)  # no auxiliary logits


@pytest.mark.parametrize("depth", [50, 101])
def test_the_mmseg_configs_build_mmsegs_models_to_the_parameter(depth):
    config = load_config(f"configs/mmseg_r{depth}.yaml")
    with torch.device("meta"):  # counting needs no memory and no forward
        inference, training = from_config(config.model), from_config(config.model, training=True)
    without, aux = MMSEG_PARAMETERS[depth]
    assert count_parameters(inference) == without and inference.aux_head is None
    assert count_parameters(training) == without + aux and count_parameters(training.aux_head) == aux


def test_resnet_v1c_deep_stem_and_contracted_dilations():
    backbone = ResNet(50, 8, stem="deep", contract_dilation=True)
    state = backbone.state_dict()
    assert "conv1.weight" not in state
    assert [tuple(state[f"stem.{i}.weight"].shape) for i in (0, 3, 6)] == [
        (32, 3, 3, 3),
        (32, 32, 3, 3),
        (64, 32, 3, 3),
    ]
    assert backbone.stem[0].stride == (2, 2) and state["stem.7.running_var"].shape == (64,)
    for layer, dilation in ((backbone.layer3, 2), (backbone.layer4, 4)):
        assert [block.conv2.dilation[0] for block in layer] == [dilation // 2] + [dilation] * (len(layer) - 1)
        assert [block.conv2.padding[0] for block in layer] == [dilation // 2] + [dilation] * (len(layer) - 1)
    assert [block.conv2.dilation[0] for block in ResNet(50, 8).layer3] == [2] * 6  # the study's: not contracted
    low, high = backbone.eval()(torch.randn(1, 3, 64, 96))
    assert low.shape == (1, 256, 16, 24) and high.shape == (1, 2048, 8, 12)


def test_separable_aspp_head_has_mmsegs_layers():
    model = DeepLabV3Plus(50, 8, head="separable-aspp")
    aspp = model.aspp
    assert aspp.pool.project[0].out_channels == 512 and aspp.branches[0][0].kernel_size == (1, 1)
    for branch, rate in zip(aspp.branches[1:], (12, 24, 36), strict=True):
        depthwise, pointwise = branch[0], branch[3]
        assert depthwise.groups == 2048 and depthwise.dilation == (rate, rate) and pointwise.kernel_size == (1, 1)
    assert aspp.project[0].in_channels == 5 * 512 and aspp.project[0].kernel_size == (3, 3)
    assert model.reduce[0].in_channels == 256 and model.reduce[0].out_channels == 48
    assert [m[0].groups for m in model.decoder] == [512 + 48, 512]
    assert isinstance(model.dropout, nn.Dropout2d) and model.dropout.p == 0.1
    assert model.classifier.in_channels == 512


def test_the_auxiliary_head_gives_logits_in_training_only():
    model = DeepLabV3Plus(50, 8, stem="deep", head="separable-aspp", aux=True)
    assert model.aux_head[0][0].in_channels == 1024 and model.aux_head[0][0].out_channels == 256
    assert model.aux_head[1].p == 0.1 and model.aux_head[2].out_channels == 19
    x = torch.randn(2, 3, 32, 48)
    logits, aux = model.train()(x)
    assert logits.shape == aux.shape == (2, 19, 32, 48)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 19, 32, 48)


@pytest.mark.parametrize(("key", "value"), [("model.stem", "v1c"), ("model.head", "psp"), ("model.aux_weight", "-1")])
def test_mmseg_model_keys_refuse_bad_values_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [f"{key}={value}", "data.shards=x"])


def test_the_auxiliary_head_is_exported_only_when_asked_and_init_from_starts_it_afresh(tmp_path):
    from seg.model.weights import export_weights, load_model, load_weights

    model = {"depth": 18, "output_stride": 8, "aspp_pool_norm": True, "aux_head": True, "aux_weight": 0.4}
    training = from_config(model, training=True)
    assert training.aux_head is not None and from_config(model).aux_head is None
    export_weights(training, tmp_path / "model.safetensors", {"config": {"model": model}, "metrics": {}})
    loaded, _ = load_model(tmp_path / "model.safetensors")
    assert loaded.aux_head is None and not any(k.startswith("aux_head") for k in loaded.state_dict())
    export_weights(training, tmp_path / "aux.safetensors", {"config": {"model": model}, "metrics": {}}, aux=True)
    with_aux, _ = load_model(tmp_path / "aux.safetensors")
    assert torch.equal(with_aux.aux_head[2].weight, training.aux_head[2].weight)
    fresh = from_config(model, training=True)
    before = fresh.aux_head[2].weight.clone()
    load_weights(fresh, tmp_path / "model.safetensors")  # a later stage from an inference file
    assert torch.equal(fresh.classifier.weight, training.classifier.weight)
    assert torch.equal(fresh.aux_head[2].weight, before)


def test_forward_flops_of_the_study_model_and_of_mmsegs_r50():
    from torch.utils.flop_counter import FlopCounterMode

    configs = {"study": load_config(None, ["data.shards=x"]), "mmseg_r50": load_config("configs/mmseg_r50.yaml")}
    for name, config in configs.items():
        with torch.device("meta"):  # shapes only: no memory, no arithmetic
            model, x = from_config(config.model).eval(), torch.empty(1, 3, 512, 1024)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(x)
        assert counter.get_total_flops() == FLOPS_512x1024[name], name


def test_a_seed_draws_the_study_models_initial_weights_as_before_the_mmseg_options():
    """Modules are registered (so initialised) in the study model's order: the same seed gives
    the same weights as the model had before the mmseg parts were added (the sha256 below was
    taken from that code), so runs stay reproducible across the change."""
    torch.manual_seed(0)
    digest = hashlib.sha256()
    for key, value in DeepLabV3Plus(18, 8).state_dict().items():
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    assert digest.hexdigest()[:16] == "a74ed3510a000980"
