import numpy as np
import pytest
from cityscapesscripts.helpers import labels as reference

from seg.core import cityscapes as cs


def test_label_table_equals_cityscapesscripts_entry_by_entry():
    assert len(cs.LABELS) == len(reference.labels)
    for ours, theirs in zip(cs.LABELS, reference.labels, strict=True):
        assert tuple(ours) == tuple(theirs)
        assert ours._fields == theirs._fields


def test_id_to_train_id_lookup_covers_all_256_ids():
    assert cs.ID_TO_TRAINID.shape == (256,)
    for label_id in range(256):
        label = reference.id2label.get(label_id)
        expected = 255 if label is None or label.ignoreInEval else label.trainId
        assert cs.ID_TO_TRAINID[label_id] == expected, label_id


def test_nineteen_classes_names_and_palette_in_train_id_order():
    evaluated = sorted((lbl for lbl in reference.labels if not lbl.ignoreInEval), key=lambda lbl: lbl.trainId)
    assert cs.NUM_CLASSES == 19
    assert [lbl.trainId for lbl in evaluated] == list(range(19))
    assert tuple(lbl.name for lbl in evaluated) == cs.CLASS_NAMES
    assert cs.PALETTE.tolist() == [list(lbl.color) for lbl in evaluated]
    for train_id, label in enumerate(evaluated):
        assert cs.TRAINID_TO_ID[train_id] == label.id


def test_colorize_uses_the_palette_and_black_for_ignore():
    train_ids = np.array([[0, 10, 255]], dtype=np.uint8)
    assert cs.colorize(train_ids).tolist() == [[[128, 64, 128], [70, 130, 180], [0, 0, 0]]]


def test_file_names_follow_the_official_layout():
    assert cs.image_path("train", "aachen", 12, 19) == "leftImg8bit/train/aachen/aachen_000012_000019_leftImg8bit.png"
    assert cs.label_path("val", "lindau", 3, 19) == "gtFine/val/lindau/lindau_000003_000019_gtFine_labelIds.png"
    assert cs.parse_stem("aachen_000012_000019") == ("aachen", 12, 19)
    with pytest.raises(ValueError, match="not a Cityscapes name"):
        cs.parse_stem("aachen_12_19")


@pytest.mark.parametrize("city", ["bad-honnef", "muhlheim-ruhr", "aachen", "city2"])
def test_cityscapes_own_city_names_are_accepted(city):
    """train_extra's cities have hyphens; the old rule (lowercase letters and underscores) refused them."""
    assert cs.parse_stem(f"{city}_000012_000019") == (city, 12, 19)


@pytest.mark.parametrize("stem", ["aachen_12_19", "2city_000012_000019", "a b_000012_000019", "_000012_000019"])
def test_a_refused_name_states_the_rule(stem):
    with pytest.raises(ValueError, match="letters, digits and hyphens starting with a letter"):
        cs.parse_stem(stem)
