"""model.pretrained by name: ImageNet backbones fetched through torch.hub's cache (no network
here: the tests place the file in a temporary cache, or serve it from a file:// URL)."""

import hashlib
import re
import urllib.error

import pytest
import torch

from seg.model.deeplab import DeepLabV3Plus, ResNet
from seg.model.weights import WeightsError, load_backbone, pretrained_file


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A temporary torch.hub cache ($TORCH_HOME/hub), as torchvision and mmcv use it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would win over TORCH_HOME
    return tmp_path / "torch" / "hub" / "checkpoints"


def imagenet_state(depth: int, stem: str = "torchvision") -> dict[str, torch.Tensor]:
    """Random weights in the layout of the published file: torchvision's resnet{depth} or
    open-mmlab's resnet{depth}_v1c (the same backbone keys as ours), plus the classifier."""
    backbone = ResNet(depth, stem=stem)
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in backbone.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, backbone.out_channels), torch.randn(1000)
    return state


def no_network(monkeypatch) -> list:
    calls = []

    def fail(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    return calls


@pytest.mark.parametrize(
    ("name", "depth", "stem", "file"),
    [
        ("imagenet", 18, "torchvision", "resnet18-f37072fd.pth"),
        ("ResNet18_Weights.IMAGENET1K_V1", 18, "torchvision", "resnet18-f37072fd.pth"),
        ("ResNet18_Weights.DEFAULT", 18, "torchvision", "resnet18-f37072fd.pth"),
        ("imagenet", 18, "deep", "resnet18_v1c-b5776b93.pth"),
        ("open-mmlab://resnet18_v1c", 18, "deep", "resnet18_v1c-b5776b93.pth"),
    ],
)
def test_a_named_backbone_is_read_from_torch_hubs_cache_and_mapped_into_the_dilated_backbone(
    hub, monkeypatch, name, depth, stem, file
):
    calls = no_network(monkeypatch)
    state = imagenet_state(depth, stem)
    hub.mkdir(parents=True)  # the file as torch.hub names it in its cache: the URL's end, hash prefix included
    torch.save({"state_dict": state} if stem == "deep" else state, hub / file)  # mmcv's files wrap the weights
    model = DeepLabV3Plus(depth, 8, stem=stem, contract_dilation=stem == "deep")
    missing, unexpected = load_backbone(model, name)
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"] and calls == []
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    first = "stem.0.weight" if stem == "deep" else "conv1.weight"
    assert torch.equal(model.backbone.state_dict()[first], state[first])


def test_the_mmseg_configs_name_open_mmlabs_v1c_weights(hub, monkeypatch):
    from seg.recipe.config import load_config

    no_network(monkeypatch)
    for depth, file in ((50, "resnet50_v1c-2cccc1ad.pth"), (101, "resnet101_v1c-e67eebb6.pth")):
        model = load_config(f"configs/mmseg_r{depth}.yaml").model
        with pytest.raises(WeightsError, match=re.escape(f"put it at {hub / file}")):
            pretrained_file(model.pretrained, model.depth, model.stem)


def test_without_the_file_and_without_network_one_line_says_what_to_download_and_where(hub, monkeypatch):
    calls = no_network(monkeypatch)
    with pytest.raises(WeightsError) as error:
        load_backbone(DeepLabV3Plus(50, 8, stem="deep"), "open-mmlab://resnet50_v1c")
    message = str(error.value)
    url = "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth"
    assert "\n" not in message and f"download {url} and put it at {hub / 'resnet50_v1c-2cccc1ad.pth'}" in message
    assert "name resolution" in message
    assert calls == [(url, str(hub / "resnet50_v1c-2cccc1ad.pth"), "2cccc1ad")]  # the sha256 prefix is checked
    assert list(hub.iterdir()) == []  # nothing half-written


def test_a_download_is_checked_against_the_sha256_prefix_of_its_name(hub, tmp_path, monkeypatch):
    """torch.hub's own download and check, from a file:// URL (no network needed)."""
    served = tmp_path / "served"
    served.mkdir()
    blob = tmp_path / "blob.pth"
    torch.save(imagenet_state(18), blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    good, bad = served / f"resnet18-{digest[:8]}.pth", served / "resnet18-00000000.pth"
    good.write_bytes(blob.read_bytes())
    bad.write_bytes(blob.read_bytes())
    for path in (good, bad):
        entries = {"ResNet18_Weights.IMAGENET1K_V1": (18, "torchvision", path.as_uri())}
        monkeypatch.setattr("seg.model.weights.PRETRAINED", entries)
        if path is bad:
            with pytest.raises(WeightsError, match=r"cannot download it \(invalid hash value"):
                pretrained_file("imagenet", 18, "torchvision")
            assert not (hub / bad.name).exists()
        else:
            assert pretrained_file("imagenet", 18, "torchvision") == hub / good.name
            assert (hub / good.name).read_bytes() == blob.read_bytes()


@pytest.mark.parametrize(
    ("name", "depth", "stem", "refusal"),
    [
        ("ResNet50_Weights.IMAGENET1K_V2", 34, "torchvision", "weights of a depth-50 ResNet.*the model is depth 34"),
        (
            "open-mmlab://resnet50_v1c",
            50,
            "torchvision",
            "with the deep stem; the model is depth 50 with the torchvision",
        ),
        ("imagenet", 34, "deep", "no published weights for depth 34 with the deep stem"),
        ("ResNet50_Weights.IMAGENET1K_V9", 50, "torchvision", "not a known name; use imagenet, ResNet18_Weights"),
        ("open-mmlab://resnet50", 50, "torchvision", "not a known name"),
    ],
)
def test_names_that_do_not_fit_the_model_are_refused_naming_them(hub, monkeypatch, name, depth, stem, refusal):
    no_network(monkeypatch)
    with pytest.raises(WeightsError, match=refusal):
        pretrained_file(name, depth, stem)


def test_a_file_of_the_other_stem_is_refused_saying_which_weights_to_use(tmp_path):
    torch.save(imagenet_state(18), tmp_path / "torchvision.pth")
    with pytest.raises(WeightsError, match=re.escape("torchvision's 7x7 stem (conv1), not the model's deep stem")):
        load_backbone(DeepLabV3Plus(18, 8, stem="deep"), tmp_path / "torchvision.pth")
    torch.save(imagenet_state(18, "deep"), tmp_path / "v1c.pth")
    with pytest.raises(WeightsError, match=re.escape("ResNetV1c's deep stem (stem.*), not the model's torchvision")):
        load_backbone(DeepLabV3Plus(18, 8), tmp_path / "v1c.pth")


def test_a_local_path_keeps_working_and_a_missing_one_is_named(tmp_path):
    torch.save(imagenet_state(18), tmp_path / "mine.pth")
    model = DeepLabV3Plus(18, 8)
    assert load_backbone(model, str(tmp_path / "mine.pth"))[0] == []
    with pytest.raises(WeightsError, match=re.escape(f"{tmp_path / 'nope.pth'}: no such file")):
        load_backbone(model, str(tmp_path / "nope.pth"))
