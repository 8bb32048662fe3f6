"""Reading what wandb wrote offline, with wandb's own protobuf definitions (no network, no
wandb.Api): the tests check what `wandb sync` would upload."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def run_record(path: Path):  # -> wandb_internal_pb2.RunRecord
    """The RunRecord of an offline ``run-*.wandb`` file (LevelDB-style records after a 7-byte
    header; the run record is one of the first)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    position = 7
    while position + 7 <= len(data):
        _, length, _ = struct.unpack("<IHB", data[position : position + 7])
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data[position + 7 : position + 7 + length])
        if record.WhichOneof("record_type") == "run":
            return record.run
        position += 7 + length
    raise AssertionError(f"{path}: no run record")


def run_config(path: Path) -> dict[str, Any]:
    """The run's config as the wandb UI gets it: top-level keys and their values."""
    return {item.key: json.loads(item.value_json) for item in run_record(path).config.update}
