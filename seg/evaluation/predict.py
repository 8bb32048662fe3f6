"""Predict image files with a model file: colourised, overlaid and labelIds PNGs.

The model is built and run the way tools/evaluate.py does: the sidecar's ``config.model``
builds the network, ``eval_sample`` decodes (and optionally resizes) the image,
DeviceAugment("none") normalises it (resized by default to the model config's
``data.eval_size``, as tools/evaluate.py does), and ``predict_probabilities`` (whole or sliding
windows, flips, scales) predicts at the image's own size. An image's PNGs are written
atomically as a set, so an error or Ctrl-C never leaves a half-written file or a half set.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from seg.core.atomic import atomic_write_all
from seg.core.cityscapes import TRAINID_TO_ID, colorize
from seg.core.png import encode_gray8
from seg.data.augment import DeviceAugment
from seg.data.transforms import eval_sample
from seg.evaluation.ensemble import load_models
from seg.evaluation.evaluate import Defaults, check_config, check_orientation, fit_window, settings
from seg.evaluation.inference import TestTimeAugmentation, predict_probabilities

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Dropped from output names: aachen_000000_000019_labelIds.png, as tools/evaluate.py --export names them.
CITYSCAPES_IMAGE = "_leftImg8bit"
MODEL_SIZE = "model"  # predict_files' size: the model config's data.eval_size


class PredictError(ValueError):
    """An input that cannot be predicted: the message names the file."""


def find_images(inputs: Iterable[str | Path], out: Path) -> list[tuple[Path, Path]]:
    """(image, output stem relative to ``out``) for image files and folders (searched
    recursively for *.png, *.jpg, *.jpeg; sub-folders are kept). Anything already under
    ``out`` is left out, so predicting into a folder inside the input does not feed on itself."""
    out = out.resolve()
    found: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_file():
            found.append((item, Path(_stem(item))))
        elif item.is_dir():
            images = [
                p
                for p in sorted(item.rglob("*"))
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(item).parts)
                and not p.resolve().is_relative_to(out)
            ]
            if not images:
                raise PredictError(f"{item}: no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}) in this folder")
            found += [(p, p.relative_to(item).parent / _stem(p)) for p in images]
        else:
            raise PredictError(f"{item}: no such file or folder")
    if not found:
        raise PredictError("no images given")
    seen: dict[Path, Path] = {}
    for image, stem in found:
        if stem in seen:
            raise PredictError(
                f"{seen[stem]} and {image} would both write {out / stem}_*.png; "
                "predict them into separate --out folders"
            )
        seen[stem] = image
    return found


def _stem(path: Path) -> str:
    return path.stem.removesuffix(CITYSCAPES_IMAGE)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """The image opened lazily; PredictError naming the file if it, or its decoding, fails."""
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise PredictError(f"{path}: cannot read the image ({e}); is it a complete PNG or JPEG?") from None


def check_image(path: Path) -> None:
    """Read only the header: cheap, and catches a file that is no image before any output."""
    with _opened(path):
        pass


def read_image(path: Path) -> Image.Image:
    """The decoded RGB image, turned as it displays (its EXIF orientation applied: a phone's
    photo is often stored sideways), so the outputs line up with it."""
    with _opened(path) as image:
        image.load()  # decode now: a truncated file fails here, before any of its outputs
        return ImageOps.exif_transpose(image).convert("RGB")


@torch.no_grad()
def predict_image(
    model: torch.nn.Module,
    image: Image.Image,
    tta: TestTimeAugmentation,
    normalise: DeviceAugment,
    device: torch.device,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """(H, W) uint8 trainIds at the image's own size; ``size`` (H, W) resizes the model's input."""
    pixels, _ = eval_sample(image, None, size)
    inputs, _ = normalise(pixels[None].to(device), train=False)
    probabilities = predict_probabilities(model, inputs, (image.height, image.width), tta)
    return probabilities.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha`` of the prediction's colours over the image."""
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(blend.round(), 0, 255).astype(np.uint8)


def _encode_rgb(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def write_outputs(stem: Path, image: Image.Image, prediction: np.ndarray, alpha: float, legend: bool = False) -> None:
    """``stem``_color.png, _overlay.png (with ``legend``: a legend of the classes it shows
    beside it, seg.results.plots.overlay_with_legend) and _labelIds.png (official label ids),
    written as a set: a full disk or Ctrl-C leaves the image's three or none new, never one alone."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    colours = colorize(prediction)
    blended = overlay(np.asarray(image), colours, alpha)
    if legend:
        from seg.results.plots import overlay_with_legend  # (matplotlib, only when asked for)

        blended = overlay_with_legend(blended, prediction)
    atomic_write_all(
        {
            f"{stem}_color.png": _encode_rgb(colours),
            f"{stem}_overlay.png": _encode_rgb(blended),
            f"{stem}_labelIds.png": encode_gray8(TRAINID_TO_ID[prediction]),
        }
    )


def predict_files(
    model_path: str | Path | list[str | Path],
    inputs: Iterable[str | Path],
    out: str | Path,
    tta: TestTimeAugmentation,
    size: tuple[int, int] | str | None = MODEL_SIZE,
    alpha: float = 0.5,
    device: torch.device | None = None,
    progress: Callable[[Path], None] | None = None,
    announce: Callable[[dict[str, Any]], None] | None = None,
    config: Path | None = None,
    say: Callable[[str], None] | None = None,
    legend: bool = False,
) -> int:
    """Predict every image of ``inputs`` into ``out``, one at a time; returns how many.

    ``size`` (H, W) resizes the model's input, None keeps each image's resolution, and
    ``MODEL_SIZE`` (the default) takes the model config's ``data.eval_size``, the size it
    was validated at. ``model_path``: a model file, or several files, a stage folder or an
    ensemble.json for their ensemble (seg.evaluation.ensemble.load_models). ``announce`` receives the
    settings (seg.evaluation.evaluate.settings) once known, ``say`` lines on what was decided (a
    config's settings, a clipped window). ``config``: a config given with the model (mmseg's
    habit), checked against its sidecar (seg.evaluation.evaluate.check_config), whose data.eval_size
    and data.size replace the sidecar's. A --size the other way round than the model's
    training size, or a slide window, is refused (seg.evaluation.evaluate.SettingsError). ``legend``:
    each overlay carries a legend of the classes it shows.
    The model and every image's header are checked before anything is written; an image
    that turns out truncated stops the run with its earlier images' outputs complete."""
    out = Path(out)
    images = find_images(inputs, out)
    for path, _ in images:
        check_image(path)
    model, sidecar, _ = load_models(model_path if isinstance(model_path, list) else [model_path])
    chosen, changed = check_config(config, sidecar) if config is not None else (None, [])
    defaults = Defaults.of(sidecar, chosen, config)
    if isinstance(size, str):
        size, size_from = defaults.input_size, f"{defaults.source} (data.eval_size)"
    else:
        size_from = "--size"
        check_orientation("--size", size, defaults)
    tta, window_from, window_lines = fit_window(tta, defaults, size)
    for line in changed + window_lines:
        if say is not None:
            say(line)
    if announce is not None:
        announce(settings(size, size_from, tta, window_from))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    normalise = DeviceAugment("none").to(device)
    for path, stem in images:
        image = read_image(path)
        prediction = predict_image(model, image, tta, normalise, device, size)
        write_outputs(out / stem, image, prediction, alpha, legend)
        if progress is not None:
            progress(path)
    return len(images)
