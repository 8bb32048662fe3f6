"""Model files: the one module that writes and reads weights.

A model file of ours is ``NAME.safetensors`` (``format: seg.deeplabv3plus`` in its metadata)
with a JSON sidecar ``NAME.json`` (the same format, the config it was trained with, its
metrics), written by :func:`export_weights` (a fold's best and final weights, a reduction's
model). :func:`read_model_file` reads one back with every check (the file, its format, its
sidecar), each refusal a :class:`WeightsError` naming the file; :func:`load_model` builds the
model its sidecar describes, seg.reduction.soup.load_fold_models averages fold models read through it.
Foreign weights, a whole model's (``--init-from``, :func:`load_weights`) or an ImageNet
backbone's (:func:`load_backbone`), are read as any state dict (:func:`read_state_dict`).
An ImageNet backbone may be named instead of a file (:func:`pretrained_file`): fetched once
into torch.hub's cache, as torchvision and mmcv fetch them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.hub
from safetensors import safe_open
from safetensors.torch import save

from seg.core.atomic import atomic_write_bytes
from seg.core.runs import Fold, Stage
from seg.model.deeplab import DeepLabV3Plus, depth_of, from_config

WEIGHTS_FORMAT = "seg.deeplabv3plus"
AUX_PREFIX = "aux_head."  # the auxiliary head's keys: training only, not exported unless asked

# ImageNet backbones by name -> (depth, stem, URL). torchvision's are its `ResNet*_Weights`
# enums' URLs (torchvision/models/resnet.py; DEFAULT is V1 for 18/34, V2 for 50/101), the
# open-mmlab ones are what mmcv's `open-mmlab://resnet*_v1c` resolves to (mmcv's
# model_zoo/open_mmlab.json). torchvision is not a dependency: these URLs are all seg needs.
# A file name's suffix after the last "-" is the start of its sha256, checked on download.
TORCHVISION = "https://download.pytorch.org/models/"
OPENMMLAB = "https://download.openmmlab.com/pretrain/third_party/"
PRETRAINED: dict[str, tuple[int, str, str]] = {
    "ResNet18_Weights.IMAGENET1K_V1": (18, "torchvision", TORCHVISION + "resnet18-f37072fd.pth"),
    "ResNet34_Weights.IMAGENET1K_V1": (34, "torchvision", TORCHVISION + "resnet34-b627a593.pth"),
    "ResNet50_Weights.IMAGENET1K_V1": (50, "torchvision", TORCHVISION + "resnet50-0676ba61.pth"),
    "ResNet50_Weights.IMAGENET1K_V2": (50, "torchvision", TORCHVISION + "resnet50-11ad3fa6.pth"),
    "ResNet101_Weights.IMAGENET1K_V1": (101, "torchvision", TORCHVISION + "resnet101-63fe2227.pth"),
    "ResNet101_Weights.IMAGENET1K_V2": (101, "torchvision", TORCHVISION + "resnet101-cd907fc2.pth"),
    "open-mmlab://resnet18_v1c": (18, "deep", OPENMMLAB + "resnet18_v1c-b5776b93.pth"),
    "open-mmlab://resnet50_v1c": (50, "deep", OPENMMLAB + "resnet50_v1c-2cccc1ad.pth"),
    "open-mmlab://resnet101_v1c": (101, "deep", OPENMMLAB + "resnet101_v1c-e67eebb6.pth"),
}
# `imagenet`: the weights a model of this depth and stem starts from (torchvision's DEFAULT)
IMAGENET = {
    (18, "torchvision"): "ResNet18_Weights.IMAGENET1K_V1",
    (34, "torchvision"): "ResNet34_Weights.IMAGENET1K_V1",
    (50, "torchvision"): "ResNet50_Weights.IMAGENET1K_V2",
    (101, "torchvision"): "ResNet101_Weights.IMAGENET1K_V2",
    (18, "deep"): "open-mmlab://resnet18_v1c",
    (50, "deep"): "open-mmlab://resnet50_v1c",
    (101, "deep"): "open-mmlab://resnet101_v1c",
}


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model: the message names the file."""


def export_weights(model: torch.nn.Module, path: Path, sidecar: dict[str, Any], aux: bool = False) -> None:
    """Weights as safetensors plus a JSON sidecar, each written atomically (sidecar last).
    The auxiliary head (training only) is left out unless ``aux``."""
    state = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if aux or not k.startswith(AUX_PREFIX)
    }
    # through atomic_write_bytes: save_file would create the file 0600 whatever the umask
    atomic_write_bytes(path, save(state, metadata={"format": WEIGHTS_FORMAT}))
    record = {"format": WEIGHTS_FORMAT, **sidecar}
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def read_model_file(
    path: str | Path, check: Callable[[dict[str, Any]], None] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model file of ours and its sidecar: (state dict, sidecar). Refused, naming the file:
    a folder or a sidecar given instead (saying what to pass), a missing or unreadable file,
    another format in the file or in its sidecar, a missing sidecar. ``check`` (a caller's
    own refusal, e.g. a fold without metrics) sees the sidecar before the weights are read."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(_folder_hint(path))
    if path.suffix == ".json" and path.is_file():
        model = path.with_suffix(".safetensors")
        there = "" if model.is_file() else f" (it is not there: copy it along with {path.name})"
        raise WeightsError(f"{path}: this is a model's JSON sidecar, not the model; pass {model}{there}")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    sidecar_path = path.with_suffix(".json")
    sidecar = _read_sidecar(sidecar_path) if sidecar_path.is_file() else None
    if sidecar is not None:
        if sidecar.get("format") != WEIGHTS_FORMAT:
            raise WeightsError(
                f"{sidecar_path}: not a seg model sidecar (format {sidecar.get('format')!r}, "
                f"expected {WEIGHTS_FORMAT!r})"
            )
        if check is not None:
            check(sidecar)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            ours = metadata.get("format") == WEIGHTS_FORMAT
            names = f.keys() if ours else []  # (a safe_open is not iterable)
            state = {name: f.get_tensor(name) for name in names}
    except Exception as e:  # safetensors raises its own error type for a torn or foreign file
        raise WeightsError(
            f"{path}: not a readable safetensors file, cannot read weights ({e}); truncated? copy it again"
        ) from None
    if not ours:
        raise WeightsError(
            f"{path}: not a seg model file (format {metadata.get('format')!r}, expected {WEIGHTS_FORMAT!r}); "
            f"pass a model written by training or tools/reduce_folds.py"
        )
    if sidecar is None:
        raise WeightsError(f"{path}: no sidecar {sidecar_path.name}; copy it along with the model")
    return state, sidecar


def load_model(path: str | Path) -> tuple[DeepLabV3Plus, dict[str, Any]]:
    """A model file of ours (:func:`read_model_file`) as an eval-mode model on the CPU, and
    its sidecar."""
    path = Path(path)
    state, sidecar = read_model_file(path)
    try:  # with the auxiliary head when the file kept it (export_weights' aux)
        model = from_config(sidecar["config"]["model"], training=any(k.startswith(AUX_PREFIX) for k in state))
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{path.with_suffix('.json')}: not a seg model sidecar ({type(e).__name__}: {e})") from None
    if problems := _misfit(state, model.state_dict()):
        described = ", ".join(f"{k}={v!r}" for k, v in sidecar["config"]["model"].items())
        raise WeightsError(
            f"{path}: does not fit the model its sidecar describes ({described}): {'; '.join(problems)}. "
            f"The weights and {path.with_suffix('.json').name} come from different models: copy both again"
        )
    model.load_state_dict(state)
    return model.eval(), sidecar


def _read_sidecar(path: Path) -> dict[str, Any]:
    """A sidecar's JSON object, or a WeightsError naming it."""
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a seg model sidecar ({type(e).__name__}: {e})") from None
    if not isinstance(sidecar, dict):
        raise WeightsError(f"{path}: not a seg model sidecar (a JSON {type(sidecar).__name__}, not an object)")
    return sidecar


def _folder_hint(path: Path) -> str:
    """What to pass instead of a folder: the model files in it (a fold's best and final
    weights, a reduction's model), or the model files one level down (a stage's folds)."""
    fold, stage = Fold.at(path), Stage.at(path)
    described = {fold.weights("best"): "the fold's best weights", fold.weights("model"): "its final weights"}
    found = [p for p in described if p.is_file()]
    if found:
        if path == Stage.at(path.parent).reduced or len(found) == 1:
            described[fold.weights("model")] = "the model"
        choices = " or ".join(f"{p} ({described[p]})" for p in found)
        return f"{path}: a folder, not a model file; pass {choices}"
    folds = sorted(Fold.at(p).weights("best") for p in path.iterdir() if p.is_dir())
    below = [p for p in folds if p.is_file()] + ([stage.reduced_model] if stage.reduced_model.is_file() else [])
    if below:
        return f"{path}: a folder, not a model file; pass one of {', '.join(map(str, below[:4]))}"
    return f"{path}: a folder with no model file (*.safetensors) in it; pass a .safetensors file"


def read_state_dict(path: str | Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (weights-only loading: no pickled
    code, unless the caller ``trusted`` the file's source)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    kinds = "a .safetensors model, or a torch state dict (.pth, .pt)"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with open(path, "rb") as f:
            head = f.read(4)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch.save's zip nor a legacy pickle
            raise WeightsError(f"{path}: not a weights file; pass {kinds}")
        state = torch.load(path, map_location="cpu", weights_only=not trusted)
    except WeightsError:
        raise
    except Exception as e:  # torch's own message runs over lines of advice: its first says what failed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"{path}: cannot read weights ({first}); pass {kinds}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint that wraps the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def pretrained_file(pretrained: str | Path, depth: int, stem: str) -> Path:
    """``model.pretrained`` as a file: a path as it is; a name of :data:`PRETRAINED` (or
    ``imagenet``: the one for this depth and stem) as its file in torch.hub's cache
    (``$TORCH_HOME/hub/checkpoints``, where torchvision and mmcv keep it), downloaded there
    first when it is not, its sha256 checked against the file name's prefix."""
    name = str(pretrained)
    if name == "imagenet":
        if (depth, stem) not in IMAGENET:
            have = ", ".join(f"depth {d} {s} stem" for d, s in IMAGENET)
            raise WeightsError(
                f"model.pretrained imagenet: no published weights for depth {depth} with the {stem} stem "
                f"(there are: {have}); pass a file"
            )
        name = IMAGENET[depth, stem]
    default = re.fullmatch(r"ResNet(\d+)_Weights\.DEFAULT", name)
    if default and (int(default.group(1)), "torchvision") in IMAGENET:
        name = IMAGENET[int(default.group(1)), "torchvision"]  # torchvision's DEFAULT alias
    if name not in PRETRAINED:
        if "://" in name or re.fullmatch(r"ResNet\d+_Weights\.\w+", name):
            known = ", ".join(PRETRAINED)
            raise WeightsError(f"model.pretrained {name!r}: not a known name; use imagenet, {known} or a file")
        return Path(name)
    want_depth, want_stem, url = PRETRAINED[name]
    if (want_depth, want_stem) != (depth, stem):
        raise WeightsError(
            f"model.pretrained {name!r}: weights of a depth-{want_depth} ResNet with the {want_stem} stem; "
            f"the model is depth {depth} with the {stem} stem (model.depth, model.stem)"
        )
    filename = url.rsplit("/", 1)[1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if path.is_file():
        return path  # as torch.hub: a cached file is trusted, its hash was checked on download
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # into a temporary file, checked, then renamed: an interrupted download leaves nothing
        torch.hub.download_url_to_file(url, str(path), hash_prefix=_hash_prefix(filename), progress=False)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a wrong hash a RuntimeError
        raise WeightsError(
            f"model.pretrained {name!r}: cannot download it ({str(e).splitlines()[0]}); download {url} "
            f"and put it at {path}"
        ) from None
    return path


def _hash_prefix(filename: str) -> str:
    """The sha256 prefix in a published file name (torch.hub's rule: ``name-<hex>.ext``)."""
    return re.search(r"-([a-f0-9]+)\.", filename).group(1)  # type: ignore[union-attr]


def load_backbone(model: DeepLabV3Plus, pretrained: str | Path) -> tuple[list[str], list[str]]:
    """Load ImageNet weights into ``model.backbone``: a file or a name (:func:`pretrained_file`)
    in torchvision's ResNet layout or, for the deep stem, ResNetV1c's (open-mmlab's).

    Returns (missing, unexpected) keys (``fc.*`` of a classifier is expected to be
    unexpected); a key whose shape differs is refused, naming it, and so are weights whose
    stem is not the model's.
    """
    stem = "deep" if hasattr(model.backbone, "stem") else "torchvision"
    path = pretrained_file(pretrained, depth_of(model), stem)
    state = read_state_dict(path)
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    own = model.backbone.state_dict()
    stem_keys = [k for k in own if not k.startswith("layer")]
    if not any(k in state for k in stem_keys):
        theirs = "ResNetV1c's deep stem (stem.*)" if "stem.0.weight" in state else "torchvision's 7x7 stem (conv1)"
        raise WeightsError(
            f"{path}: the weights have {theirs}, not the model's {stem} stem: set model.stem or use "
            f"{'open-mmlab://resnet*_v1c' if stem == 'deep' else 'torchvision'} weights"
        )
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise WeightsError(
                f"{path}: {key} has shape {tuple(value.shape)}, the depth-{depth_of(model)} backbone needs "
                f"{tuple(own[key].shape)}: weights of another ResNet depth?"
            )
    result = model.backbone.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def load_weights(model: DeepLabV3Plus, path: str | Path, config: Mapping[str, Any] | None = None) -> None:
    """Load a whole model's weights (``--init-from``). A file that does not fit is refused in
    one line: the file, the first missing, unexpected and mismatched keys with their shapes,
    and the likely cause (its sidecar's model, when it has one, against ``config``)."""
    load_state(model, read_state_dict(path), path, config)


def load_state(
    model: DeepLabV3Plus, state: dict[str, torch.Tensor], path: str | Path, config: Mapping[str, Any] | None = None
) -> None:
    """:func:`load_weights` for a state dict read from ``path`` (and converted, e.g. mmseg's)."""
    own = model.state_dict()
    # a training model's auxiliary head starts afresh from a file without one (as in mmseg)
    fresh = () if any(k.startswith(AUX_PREFIX) for k in state) else tuple(k for k in own if k.startswith(AUX_PREFIX))
    own = {k: v for k, v in own.items() if k not in fresh}
    problems = _misfit(state, own)
    if not problems:
        model.load_state_dict(state, strict=not fresh)
        return
    missing = [k for k in own if k not in state]
    raise WeightsError(
        f"{path}: does not fit the depth-{depth_of(model)} model of this config: {'; '.join(problems)}. "
        f"Likely cause: {_misfit_cause(Path(path), state, missing, own, config)}"
    )


def _misfit(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> list[str]:
    """How ``state`` does not fit a model whose state dict is ``own``: the first missing,
    unexpected and mismatched keys with their shapes (none when it fits)."""
    missing = [k for k in own if k not in state]
    unexpected = sorted((k for k in state if k not in own), key=lambda k: k.endswith("num_batches_tracked"))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]

    def first(keys: list[str], show: Any) -> str:
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        return f"{len(keys)}, e.g. " + ", ".join(show(k) for k in keys[:3]) + more

    problems = [f"missing {first(missing, lambda k: f'{k} {tuple(own[k].shape)}')}"] if missing else []
    problems += [f"unexpected {first(unexpected, lambda k: f'{k} {tuple(state[k].shape)}')}"] if unexpected else []
    shapes = lambda k: f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"  # noqa: E731
    problems += [f"other shapes {first(mismatched, shapes)}"] if mismatched else []
    return problems


def _misfit_cause(
    path: Path, state: Mapping[str, torch.Tensor], missing: list[str], own: Mapping[str, Any], config: Any
) -> str:
    sidecar = path.with_suffix(".json")
    theirs: Any = None
    if sidecar.is_file():
        try:
            theirs = _read_sidecar(sidecar)["config"]["model"]
        except (WeightsError, KeyError, TypeError):
            theirs = None
    if theirs is not None and config is not None:
        keys, study = ("depth", "aspp_pool_norm", "stem", "head"), {"stem": "torchvision", "head": "aspp"}
        values = {k: (theirs.get(k, study.get(k)), config.get(k, study.get(k))) for k in keys}
        differ = [f"model.{k}={a!r} there, {b!r} here" for k, (a, b) in values.items() if a != b]
        if differ:
            return f"its sidecar describes another model ({'; '.join(differ)}): set the same model keys"
    if len(missing) == len(own):
        if any(k.startswith("layer1.") or k == "fc.weight" for k in state):
            return "an ImageNet backbone in torchvision's layout, not a seg model: pass it as model.pretrained"
        return "not a seg DeepLabV3+ model (weights of another network)"
    differing = [*missing, *(k for k in state if k not in own or state[k].shape != own[k].shape)]
    if any(k.startswith("backbone.") for k in differing):
        return "a model of another ResNet depth: set model.depth to the file's"
    if any(k.startswith("aspp.pool") for k in differing):
        return "model.aspp_pool_norm differs from the file's"
    if "classifier.weight" in state and state["classifier.weight"].shape != own["classifier.weight"].shape:
        return "a model of another class count"
    return "a model of another architecture: model.depth or model.aspp_pool_norm differ from the file's"


# mmseg's DeepLabV3+ (EncoderDecoder) keys -> seg's, by prefix (first match). The modules
# mirror mmseg's layer by layer (seg/model/deeplab.py), so only the names differ.
MMSEG_PREFIXES = (
    ("backbone.", "backbone."),
    ("decode_head.image_pool.1.", "aspp.pool.project."),
    ("decode_head.aspp_modules.", "aspp.branches."),
    ("decode_head.bottleneck.", "aspp.project."),
    ("decode_head.c1_bottleneck.", "reduce."),
    ("decode_head.sep_bottleneck.", "decoder."),
    ("decode_head.conv_seg.", "classifier."),
    ("auxiliary_head.convs.0.", "aux_head.0."),
    ("auxiliary_head.conv_seg.", "aux_head.2."),
)
# inside a head's mmcv ConvModule (conv, bn) or DepthwiseSeparableConvModule (two of them)
MMCV_MODULES = (
    ("depthwise_conv.conv.", "0."),
    ("depthwise_conv.bn.", "1."),
    ("pointwise_conv.conv.", "3."),
    ("pointwise_conv.bn.", "4."),
    ("conv.", "0."),
    ("bn.", "1."),
)


def from_mmseg(state: Mapping[str, torch.Tensor], path: str | Path, aux: bool = False) -> dict[str, torch.Tensor]:
    """An mmseg DeepLabV3+ checkpoint's weights (``state_dict``) under seg's names; the
    auxiliary head's only with ``aux``. A key of another network is refused, naming it."""
    converted = {}
    for key, value in state.items():
        prefix = next((p for p in MMSEG_PREFIXES if key.startswith(p[0])), None)
        if prefix is None:
            raise WeightsError(
                f"{path}: {key} is not a key of mmseg's DeepLabV3+ "
                f"(DepthwiseSeparableASPPHead, FCNHead auxiliary head): another mmseg model?"
            )
        if key.startswith("auxiliary_head.") and not aux:
            continue
        rest = key[len(prefix[0]) :]
        if prefix[1] not in ("backbone.", "classifier.", "aux_head.2."):
            indexed = prefix[0] in ("decode_head.aspp_modules.", "decode_head.sep_bottleneck.")
            head, _, name = rest.partition(".") if indexed else ("", "", rest)
            part = next((m for m in MMCV_MODULES if name.startswith(m[0])), None)
            if part is not None:
                name = part[1] + name[len(part[0]) :]
            rest = f"{head}.{name}" if head else name
        converted[prefix[1] + rest] = value
    return converted
