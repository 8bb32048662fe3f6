#!/usr/bin/env python
"""Turn an mmsegmentation DeepLabV3+ checkpoint into a seg model file (with its sidecar).

    python tools/convert_mmseg.py deeplabv3plus_r50-d8_512x1024_80k_cityscapes_20200606_114049-f9fb496d.pth \\
        --config configs/mmseg_r50.yaml --out models/mmseg_r50.safetensors

The config names the model (configs/mmseg_r50.yaml or mmseg_r101.yaml build mmseg's
``deeplabv3plus_r{50,101}-d8``); every weight of the checkpoint must fit it, or the
conversion is refused naming the keys. The auxiliary head (training only) is left out unless
--with-aux. The model file is then seg's like any other: tools/evaluate.py, tools/predict.py,
``--init-from`` for fine-tuning. Its sidecar records the config and the checkpoint's name and
sha256; its ``metrics`` are empty (the model was not validated by seg). mmseg normalises
RGB images with ImageNet's mean and std, as seg does, so nothing else changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python tools/convert_mmseg.py` from a checkout: make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.data.manifest import sha256_file
from seg.model.deeplab import from_config
from seg.model.weights import WeightsError, export_weights, from_mmseg, load_state, read_state_dict
from seg.recipe.config import ConfigError, load_config, to_dict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="an mmseg checkpoint (.pth: {'state_dict': ..., 'meta': ...})")
    parser.add_argument("--config", type=Path, required=True, help="the seg config of its model (configs/mmseg_*.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="the model file to write (.safetensors)")
    parser.add_argument("--with-aux", action="store_true", help="keep the auxiliary head's weights (to train on)")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="load a checkpoint that pickles more than tensors (trusted source)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.suffix != ".safetensors":
        print(f"error: --out {args.out}: a model file ends in .safetensors", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        model = from_config(config.model, training=args.with_aux)
        if args.with_aux and model.aux_head is None:
            raise ConfigError(f"--with-aux: {args.config} has model.aux_head false; set model.aux_head=true")
        state = from_mmseg(read_state_dict(args.checkpoint, args.trust_pickle), args.checkpoint, aux=args.with_aux)
        load_state(model, state, args.checkpoint, config.model)
    except (ConfigError, WeightsError) as e:
        hint = "; if you trust its source, pass --trust-pickle" if "Weights only load failed" in str(e) else ""
        print(f"error: {str(e).splitlines()[0]}{hint}", file=sys.stderr)
        return 2
    sidecar = {
        "config": to_dict(config),
        "metrics": {},
        "converted_from": {"mmseg_checkpoint": args.checkpoint.name, "sha256": sha256_file(args.checkpoint)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export_weights(model.eval(), args.out, sidecar, aux=args.with_aux)
    kept = " (with the auxiliary head)" if args.with_aux else ""
    print(f"{args.checkpoint} -> {args.out}{kept} and {args.out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
