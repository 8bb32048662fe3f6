"""The Cityscapes label definitions and file naming.

The table is the official one (cityscapesScripts' ``helpers/labels.py``), copied so that
the runtime does not depend on cityscapesScripts; ``tests/test_cityscapes.py`` compares it
with that package entry by entry.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

IGNORE_INDEX = 255


class Label(NamedTuple):
    name: str
    id: int
    trainId: int  # noqa: N815 - the official field name
    category: str
    categoryId: int  # noqa: N815
    hasInstances: bool  # noqa: N815
    ignoreInEval: bool  # noqa: N815
    color: tuple[int, int, int]


# fmt: off
LABELS: tuple[Label, ...] = (
    #     name                    id  trainId  category        catId  hasInst ignoreInEval  color
    Label("unlabeled",             0, 255, "void",          0, False, True,  (0, 0, 0)),
    Label("ego vehicle",           1, 255, "void",          0, False, True,  (0, 0, 0)),
    Label("rectification border",  2, 255, "void",          0, False, True,  (0, 0, 0)),
    Label("out of roi",            3, 255, "void",          0, False, True,  (0, 0, 0)),
    Label("static",                4, 255, "void",          0, False, True,  (0, 0, 0)),
    Label("dynamic",               5, 255, "void",          0, False, True,  (111, 74, 0)),
    Label("ground",                6, 255, "void",          0, False, True,  (81, 0, 81)),
    Label("road",                  7,   0, "flat",          1, False, False, (128, 64, 128)),
    Label("sidewalk",              8,   1, "flat",          1, False, False, (244, 35, 232)),
    Label("parking",               9, 255, "flat",          1, False, True,  (250, 170, 160)),
    Label("rail track",           10, 255, "flat",          1, False, True,  (230, 150, 140)),
    Label("building",             11,   2, "construction",  2, False, False, (70, 70, 70)),
    Label("wall",                 12,   3, "construction",  2, False, False, (102, 102, 156)),
    Label("fence",                13,   4, "construction",  2, False, False, (190, 153, 153)),
    Label("guard rail",           14, 255, "construction",  2, False, True,  (180, 165, 180)),
    Label("bridge",               15, 255, "construction",  2, False, True,  (150, 100, 100)),
    Label("tunnel",               16, 255, "construction",  2, False, True,  (150, 120, 90)),
    Label("pole",                 17,   5, "object",        3, False, False, (153, 153, 153)),
    Label("polegroup",            18, 255, "object",        3, False, True,  (153, 153, 153)),
    Label("traffic light",        19,   6, "object",        3, False, False, (250, 170, 30)),
    Label("traffic sign",         20,   7, "object",        3, False, False, (220, 220, 0)),
    Label("vegetation",           21,   8, "nature",        4, False, False, (107, 142, 35)),
    Label("terrain",              22,   9, "nature",        4, False, False, (152, 251, 152)),
    Label("sky",                  23,  10, "sky",           5, False, False, (70, 130, 180)),
    Label("person",               24,  11, "human",         6, True,  False, (220, 20, 60)),
    Label("rider",                25,  12, "human",         6, True,  False, (255, 0, 0)),
    Label("car",                  26,  13, "vehicle",       7, True,  False, (0, 0, 142)),
    Label("truck",                27,  14, "vehicle",       7, True,  False, (0, 0, 70)),
    Label("bus",                  28,  15, "vehicle",       7, True,  False, (0, 60, 100)),
    Label("caravan",              29, 255, "vehicle",       7, True,  True,  (0, 0, 90)),
    Label("trailer",              30, 255, "vehicle",       7, True,  True,  (0, 0, 110)),
    Label("train",                31,  16, "vehicle",       7, True,  False, (0, 80, 100)),
    Label("motorcycle",           32,  17, "vehicle",       7, True,  False, (0, 0, 230)),
    Label("bicycle",              33,  18, "vehicle",       7, True,  False, (119, 11, 32)),
    Label("license plate",        -1,  -1, "vehicle",       7, False, True,  (0, 0, 142)),
)
# fmt: on

LABEL_BY_ID: dict[int, Label] = {label.id: label for label in LABELS}
LABEL_BY_NAME: dict[str, Label] = {label.name: label for label in LABELS}

EVAL_LABELS: tuple[Label, ...] = tuple(
    sorted((label for label in LABELS if not label.ignoreInEval), key=lambda label: label.trainId)
)
NUM_CLASSES = len(EVAL_LABELS)  # 19
CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in EVAL_LABELS)
PALETTE: np.ndarray = np.array([label.color for label in EVAL_LABELS], dtype=np.uint8)  # (19, 3)

# Label ids present in the official table: anything else in a labelIds PNG is corrupt data.
VALID_IDS: frozenset[int] = frozenset(label.id for label in LABELS if label.id >= 0)
VALID_TRAIN_IDS: frozenset[int] = frozenset(range(NUM_CLASSES)) | {IGNORE_INDEX}


def _id_to_train_id() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in EVAL_LABELS:
        lut[label.id] = label.trainId
    return lut


ID_TO_TRAINID: np.ndarray = _id_to_train_id()  # (256,) uint8: every id not evaluated -> 255

# trainId -> official id, for exporting predictions the way the benchmark server expects.
TRAINID_TO_ID: np.ndarray = np.zeros(256, dtype=np.uint8)
for _label in EVAL_LABELS:
    TRAINID_TO_ID[_label.trainId] = _label.id


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) trainIds -> (H, W, 3) uint8 colours; ignore is black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:NUM_CLASSES] = PALETTE
    return table[train_ids]


# --- file naming --------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
LABEL_TRAINIDS_SUFFIX = "_gtFine_labelTrainIds.png"
COLOR_SUFFIX = "_gtFine_color.png"
# A city is letters, digits and hyphens (train_extra has bad-honnef and muhlheim-ruhr), starting with a
# letter; the underscore is the separator, so it cannot be in the city.
CITY_RULE = "a city of letters, digits and hyphens starting with a letter, then 6 digits, then 6 digits"
_STEM = re.compile(r"^(?P<city>[A-Za-z][A-Za-z0-9-]*)_(?P<seq>\d{6})_(?P<frame>\d{6})$")


def image_path(split: str, city: str, seq: int, frame: int) -> str:
    """Path of an image relative to the Cityscapes root."""
    return f"leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}{IMAGE_SUFFIX}"


def label_path(split: str, city: str, seq: int, frame: int, suffix: str = LABEL_IDS_SUFFIX) -> str:
    """Path of a gtFine file relative to the Cityscapes root."""
    return f"gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}{suffix}"


def parse_stem(stem: str) -> tuple[str, int, int]:
    """``aachen_000012_000019`` -> (``aachen``, 12, 19); ValueError if it is not one."""
    match = _STEM.match(stem)
    if not match:
        raise ValueError(f"{stem!r} is not a Cityscapes name <city>_<seq:06d>_<frame:06d> ({CITY_RULE})")
    return match["city"], int(match["seq"]), int(match["frame"])
