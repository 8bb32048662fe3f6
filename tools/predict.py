#!/usr/bin/env python
"""Predict images with a model file: colourised, overlaid and labelIds PNGs.

    python tools/predict.py runs/study/stage4/reduced/model.safetensors photo.jpg --out pred/
    python tools/predict.py MODEL data/leftImg8bit/test --out pred/ --mode slide --flip --scales 0.75 1.0 1.25
    python tools/predict.py MODEL frames/ --out pred/ --size 1024x512 --alpha 0.6
    python tools/predict.py MODEL frames/ --out pred/ --size full    # each image at its own resolution
    python tools/predict.py A.safetensors B.safetensors frames/ --out pred/   # an ensemble of the models
    python tools/predict.py runs/study/stage4/reduced/ensemble.json frames/ --out pred/
    python tools/predict.py configs/X.yaml MODEL frames/ --out pred/      # a config first, as mmseg's demo

IMAGES are files or folders (searched recursively for *.png, *.jpg, *.jpeg; the sub-folders
are kept under --out). Each image gives NAME_color.png (Cityscapes palette), NAME_overlay.png
(the colours blended over the image; with --legend, a legend of the classes it shows
beside it) and NAME_labelIds.png (official label ids, as the
Cityscapes benchmark expects), all at the image's size; NAME drops a ``_leftImg8bit`` suffix.
The model's input is resized to the model config's ``data.eval_size`` (the size it was
validated at; printed) unless --size says otherwise. One image at a time, on CUDA when
there is one, else on the CPU.

MODEL is a .safetensors file; the leading .safetensors arguments all are models, whose
ensemble (their class probabilities averaged, a forward pass each) predicts. MODEL may also be
an ensemble.json (tools/reduce_folds.py writes one in reduced/) or a stage folder (its
reduced/ensemble.json, else every fold*/best.safetensors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python tools/predict.py` from a checkout, not installed: make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from seg.core.storage import EXIT_STORAGE, StorageError, check_writable, writing
from seg.evaluation.evaluate import SettingsError, describe_settings, parse_input_size, split_config
from seg.evaluation.inference import TestTimeAugmentation
from seg.evaluation.predict import MODEL_SIZE, PredictError, predict_files
from seg.model.weights import WeightsError
from seg.results.tables import count as plural


def alpha(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: between 0 and 1")
    return value


def split_models(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(models, images): the leading .safetensors files (else the first path alone), then the rest."""
    count = 0
    while count < len(paths) and paths[count].suffix == ".safetensors":
        count += 1
    count = max(count, 1)
    return paths[:count], paths[count:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="[CONFIG] MODEL... IMAGES",
        help="the model (a .safetensors file with its .json sidecar; several for an ensemble, or an ensemble.json "
        "or a stage folder), then image files or folders; a config (.yaml) first, as mmseg's habit, must describe "
        "the model's network, and its data.eval_size and data.size then replace the model's",
    )
    parser.add_argument("--out", type=Path, required=True, help="where the PNGs go")
    TestTimeAugmentation.add_arguments(parser)
    parser.add_argument(
        "--size",
        type=parse_input_size,
        help="resize the model's input to WIDTHxHEIGHT, or 'full' (default: the model config's data.eval_size); "
        "outputs keep the image's size",
    )
    parser.add_argument("--alpha", type=alpha, default=0.5, help="weight of the colours in the overlay (default 0.5)")
    parser.add_argument(
        "--legend", action="store_true", help="give each overlay a legend of the classes it shows (to its right)"
    )
    args = parser.parse_args(argv)
    tta = TestTimeAugmentation.from_arguments(args, parser)
    try:
        config, paths = split_config(args.paths)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    models, images = split_models(paths)
    if not images:
        parser.error("give the model, then at least one image file or folder")

    if args.size is None:
        size: tuple[int, int] | str | None = MODEL_SIZE
    else:
        size = None if args.size == "full" else tuple(args.size)

    def announce(record: dict) -> None:
        hint = " (--size WIDTHxHEIGHT or full to change it)" if args.size is None else ""
        print(f"{describe_settings(record)}; input size from {record['input_size_from']}{hint}", flush=True)

    bar = tqdm(disable=not sys.stderr.isatty(), unit="image", dynamic_ncols=True)
    try:
        check_writable(args.out)
        with writing(args.out):
            count = predict_files(
                models,
                images,
                args.out,
                tta,
                size,
                args.alpha,
                progress=lambda _: bar.update(),
                announce=announce,
                config=config,
                say=lambda line: print(line, flush=True),
                legend=args.legend,
            )
    except (WeightsError, PredictError, SettingsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except KeyboardInterrupt:  # what was written is whole (each image's set is atomic): one line, no traceback
        print(f"interrupted: the images predicted before are complete in {args.out}, none in part; exit 130",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        bar.close()
    print(f"{plural(count, 'image')} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
