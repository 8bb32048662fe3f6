import math
import os
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as reference  # noqa: N813
from cityscapesscripts.helpers.labels import labels as reference_labels

from seg.core.cityscapes import EVAL_LABELS
from seg.evaluation.metrics import ConfusionMatrix, pooled


def test_hand_computed_case():
    # 4 classes; class 3 appears in neither label nor prediction
    target = torch.tensor([0, 0, 0, 1, 1, 2, 255, 255])
    prediction = torch.tensor([0, 0, 1, 1, 2, 2, 3, 0])
    cm = ConfusionMatrix(4)
    cm.update(prediction, target)
    result = cm.compute()
    iou = list(result["iou"].values())
    assert iou[0] == pytest.approx(2 / 3)  # tp 2, fn 1, fp 0
    assert iou[1] == pytest.approx(1 / 3)  # tp 1, fn 1, fp 1
    assert iou[2] == pytest.approx(1 / 2)  # tp 1, fn 0, fp 1
    assert math.isnan(iou[3])  # predicted only on an ignored pixel: does not count
    assert result["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 6)
    assert result["mean_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert result["fwiou"] == pytest.approx(3 / 6 * 2 / 3 + 2 / 6 * 1 / 3 + 1 / 6 * 1 / 2)
    assert result["pixels"] == 6


def test_iou_and_miou_equal_the_cityscapes_scripts():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.integers(0, 19, size=20_000))
    prediction = torch.where(torch.rand(20_000) < 0.6, target, torch.from_numpy(rng.integers(0, 19, size=20_000)))
    target[:500], prediction[3] = 255, 7
    cm = ConfusionMatrix()
    cm.update(prediction, target)
    ours = cm.compute()

    # cityscapesScripts' confusion matrix is indexed by label ids
    conf = np.zeros((34, 34), dtype=np.int64)
    ids = [label.id for label in EVAL_LABELS]
    conf[np.ix_(ids, ids)] = cm.matrix.numpy()
    args = types.SimpleNamespace(evalLabels=[label.id for label in reference_labels if label.id >= 0])
    theirs = {label.name: reference.getIouScoreForLabel(label.id, conf, args) for label in EVAL_LABELS}
    assert ours["iou"] == pytest.approx(theirs)
    assert ours["miou"] == pytest.approx(reference.getScoreAverage(theirs, args))


def test_shapes_and_classes_are_checked():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="differ"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        cm.update(torch.tensor([3]), torch.tensor([0]))


def _rank(rank: int, world: int, init_file: str, chunks: list, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cm = ConfusionMatrix()
    for prediction, target in chunks[rank]:  # rank 2 has nothing, but still reduces
        cm.update(prediction, target)
    cm.reduce()
    out[rank] = cm.matrix.clone()
    dist.destroy_process_group()


def test_three_gloo_ranks_with_uneven_data_reduce_to_the_single_process_matrix(tmp_path):
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 19, (2, 16, 16), generator=generator), torch.randint(0, 19, (2, 16, 16), generator=generator))
        for _ in range(5)
    ]
    batches = [(p, torch.where(t % 7 == 0, 255, t)) for p, t in batches]
    single = ConfusionMatrix()
    for prediction, target in batches:
        single.update(prediction, target)
    chunks = [batches[:4], batches[4:], []]
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_rank, args=(3, str(tmp_path / "init"), chunks, out), nprocs=3, start_method="spawn")
    for rank in range(3):
        assert torch.equal(out[rank], single.matrix)
    assert single.matrix.sum() > 0


def test_compute_carries_the_matrix_and_pooling_sums_before_scoring():
    generator = torch.Generator().manual_seed(1)
    sets = [
        (torch.randint(0, 19, (n, 8, 8), generator=generator), torch.randint(0, 19, (n, 8, 8), generator=generator))
        for n in (1, 3, 6)
    ]
    parts, single = [], ConfusionMatrix()
    for prediction, target in sets:
        part = ConfusionMatrix()
        part.update(prediction, target)
        single.update(prediction, target)
        result = part.compute()
        assert result["confusion"] == part.matrix.tolist() and sum(map(sum, result["confusion"])) == result["pixels"]
        assert ConfusionMatrix.from_counts(result["confusion"]).compute() == result
        parts.append(result["confusion"])
    assert pooled(parts) == single.compute()
    with pytest.raises(ValueError, match="square table of counts"):
        ConfusionMatrix.from_counts([[1.5, 0], [0, 1]])


def test_pooled_miou_is_not_the_mean_of_the_folds_miou_on_unbalanced_folds():
    """Fold A: one small image, a rare class missed; fold B: a large image, all right. The mean
    of their mIoUs counts A's miss as much as B's whole image; the pooled score does not."""
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 2]))  # class 2 missed once
    b.update(torch.tensor([0] * 50 + [1] * 40 + [2] * 10), torch.tensor([0] * 50 + [1] * 40 + [2] * 10))
    per_fold = [a.compute()["miou"], b.compute()["miou"]]
    pooled_miou = pooled([a.compute()["confusion"], b.compute()["confusion"]])["miou"]
    # pooled: class 0 IoU 53/54, class 1 1, class 2 10/11
    assert pooled_miou == pytest.approx((53 / 54 + 1 + 10 / 11) / 3)
    assert per_fold == pytest.approx([(3 / 4 + 0) / 2, 1.0])
    assert abs(pooled_miou - float(np.mean(per_fold))) > 0.2
