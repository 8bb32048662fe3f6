import math

import pytest
import torch

from seg.recipe.config import LossConfig
from seg.recipe.losses import (
    CombinedLoss,
    OHEMLoss,
    class_weights_from_pixels,
    cross_entropy,
    dice_loss,
    from_config,
    ohem_cross_entropy,
)
from tools.bench_loss import main as bench_loss

# Two valid pixels and one ignored, three classes: logits (1, 3, 1, 3), targets (1, 1, 3).
LOGITS = torch.tensor([[[[2.0, 0.0, 5.0]], [[1.0, 3.0, -5.0]], [[0.0, 1.0, 0.0]]]])
TARGET = torch.tensor([[[0, 1, 255]]])


def log_softmax(column: list[float]) -> list[float]:
    norm = math.log(sum(math.exp(v) for v in column))
    return [v - norm for v in column]


P0 = log_softmax([2.0, 1.0, 0.0])  # pixel 0, true class 0
P1 = log_softmax([0.0, 3.0, 1.0])  # pixel 1, true class 1


def test_cross_entropy_with_smoothing_by_hand():
    s = 0.1
    per_pixel = [-((1 - s) * p[t] + s / 3 * sum(p)) for p, t in ((P0, 0), (P1, 1))]
    assert cross_entropy(LOGITS, TARGET, label_smoothing=s).item() == pytest.approx(sum(per_pixel) / 2, rel=1e-6)


def test_cross_entropy_with_class_weights_by_hand():
    weight = torch.tensor([2.0, 0.5, 1.0])
    expected = (2.0 * -P0[0] + 0.5 * -P1[1]) / (2.0 + 0.5)
    assert cross_entropy(LOGITS, TARGET, weight=weight).item() == pytest.approx(expected, rel=1e-6)


def test_dice_by_hand_averages_only_the_classes_present():
    probs = [[math.exp(v) for v in P0], [math.exp(v) for v in P1]]
    dice = []
    for c in (0, 1):  # class 2 is absent from the target: not averaged (the study counted it as 0)
        intersection = sum(p[c] for p, t in zip(probs, (0, 1), strict=True) if t == c)
        dice.append((2 * intersection + 1) / (probs[0][c] + probs[1][c] + 1 + 1))
    assert dice_loss(LOGITS, TARGET).item() == pytest.approx(1 - sum(dice) / 2, rel=1e-6)


def test_dice_equals_the_one_hot_formula_in_value_and_gradient_whatever_the_label_dtype():
    """The one-hot target is a broadcast comparison, not F.one_hot (tools/bench_loss.py): the
    same sums as the textbook formula, over uint8 labels (the loader's) as over int64."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 19, 12, 20, generator=generator, requires_grad=True)
    target = torch.randint(0, 19, (2, 12, 20), generator=generator)
    target[0, :3], target[1, :, :4] = 255, 255
    valid = (target != 255).unsqueeze(1).float()
    probs = logits.softmax(1) * valid
    onehot = torch.nn.functional.one_hot(torch.where(target == 255, 0, target), 19).permute(0, 3, 1, 2) * valid
    inter, psum, tsum = (probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)), onehot.sum((0, 2, 3))
    present = tsum > 0
    expected = 1 - ((2 * inter + 1) / (psum + tsum + 1))[present].mean()
    (expected_grad,) = torch.autograd.grad(expected, logits)
    for labels in (target, target.to(torch.uint8)):
        value = dice_loss(logits, labels)
        (grad,) = torch.autograd.grad(value, logits)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, expected_grad)


def test_bench_loss_times_each_term_and_refuses_a_zero_batch(capsys):
    assert bench_loss(["--batch", "1", "--size", "64x32", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"batch 1 at 64x32, fp32 logits, on CPU, {torch.get_num_threads()} threads" in out
    rows = {line.rsplit(None, 2)[0]: float(line.split()[-2]) for line in out.splitlines()[2:]}
    assert set(rows) == {"softmax alone", "cross entropy", "dice", "combined (study)", "ohem"}
    assert all(ms > 0 for ms in rows.values())
    with pytest.raises(SystemExit) as refused:
        bench_loss(["--batch", "0"])
    assert refused.value.code == 2 and "error: argument --batch: 0: at least 1" in capsys.readouterr().err


def test_bench_loss_reports_a_loss_that_breaks_in_its_row_and_goes_on(monkeypatch, capsys):
    import tools.bench_loss

    def broken(logits, target):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore lines")

    monkeypatch.setattr(tools.bench_loss, "losses", lambda device: {"broken": broken, "dice": dice_loss})
    assert bench_loss(["--batch", "1", "--size", "64x32", "--steps", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["broken", "RuntimeError:", "CUDA", "out", "of", "memory.", "Tried", "to",
                                "allocate", "20.00", "GiB"]  # fmt: skip
    assert lines[3].split()[0] == "dice" and float(lines[3].split()[1]) > 0
    monkeypatch.setattr(tools.bench_loss, "inputs", lambda *args: broken(None, None))  # no room for the batch
    assert bench_loss(["--batch", "1", "--size", "64x32", "--steps", "1"]) == 1
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split()[:2] for r in rows] == [["broken", "RuntimeError:"], ["dice", "RuntimeError:"]]


def test_ohem_keeps_the_hard_pixels_by_hand():
    p0, p1 = math.exp(P0[0]), math.exp(P1[1])  # true-class probabilities 0.665 and 0.844
    # threshold 0.7, min_kept 1: only pixel 0 is below 0.7
    assert ohem_cross_entropy(LOGITS, TARGET, threshold=0.7, min_kept=1).item() == pytest.approx(-P0[0], rel=1e-6)
    # threshold 0.5 keeps nothing by itself; min_kept 1 keeps pixels below the 2nd-lowest probability
    assert p0 < p1
    assert ohem_cross_entropy(LOGITS, TARGET, threshold=0.5, min_kept=1).item() == pytest.approx(-P0[0], rel=1e-6)
    # a high threshold keeps both
    expected = (-P0[0] - P1[1]) / 2
    assert ohem_cross_entropy(LOGITS, TARGET, threshold=0.95, min_kept=1).item() == pytest.approx(expected, rel=1e-6)


def test_combined_is_alpha_ce_plus_one_minus_alpha_dice():
    loss = CombinedLoss(alpha=0.6, label_smoothing=0.1)
    total, parts = loss(LOGITS, TARGET)
    assert total.item() == pytest.approx(0.6 * parts["ce"].item() + 0.4 * parts["dice"].item(), rel=1e-6)
    assert parts["ce"].item() == pytest.approx(cross_entropy(LOGITS, TARGET, label_smoothing=0.1).item())


def test_a_term_of_weight_zero_is_neither_computed_nor_reported(monkeypatch):
    """mmseg's recipes (loss.name=ce) are plain CE: no Dice over the full-resolution logits."""
    import seg.recipe.losses as losses

    ce_only, dice_only = CombinedLoss(alpha=1.0, label_smoothing=0.1), CombinedLoss(alpha=0.0)
    expected_ce, expected_dice = cross_entropy(LOGITS, TARGET, label_smoothing=0.1), dice_loss(LOGITS, TARGET)

    def forbidden(*args, **kwargs):
        raise AssertionError("computed")

    monkeypatch.setattr(losses, "dice_loss", forbidden)
    total, parts = ce_only(LOGITS, TARGET)
    assert list(parts) == ["ce"] and torch.equal(total, expected_ce)
    monkeypatch.undo()
    monkeypatch.setattr(losses, "cross_entropy", forbidden)
    total, parts = dice_only(LOGITS, TARGET)
    assert list(parts) == ["dice"] and torch.equal(total, expected_dice)


LOSSES = {
    "ce": lambda x, t: cross_entropy(x, t),
    "ce-smoothed": lambda x, t: cross_entropy(x, t, label_smoothing=0.1),
    "dice": dice_loss,
    "ohem": lambda x, t: ohem_cross_entropy(x, t, threshold=0.7, min_kept=2),
    "combined": lambda x, t: CombinedLoss()(x, t)[0],
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_carries_gradient_to_the_logits_and_none_to_ignored_pixels(name):
    logits = torch.randn(2, 19, 8, 8, requires_grad=True)
    target = torch.randint(0, 19, (2, 8, 8))
    target[:, :2] = 255
    LOSSES[name](logits, target).backward()
    assert logits.grad[:, :, 2:].abs().sum() > 0
    assert logits.grad[:, :, :2].abs().sum() == 0


def test_the_smoothing_term_trains():
    """The study's smoothed CE took its log-probabilities under no_grad: the gradient of the
    smoothed loss must differ from the plain one by exactly the smoothing term's."""
    logits = torch.randn(1, 19, 4, 4, requires_grad=True)
    target = torch.randint(0, 19, (1, 4, 4))
    s = 0.1
    (grad_smoothed,) = torch.autograd.grad(cross_entropy(logits, target, label_smoothing=s), logits)
    (grad_plain,) = torch.autograd.grad(cross_entropy(logits, target), logits)
    uniform = -(logits.log_softmax(1)).mean(1).mean()  # the term the smoothing adds, per pixel averaged
    (grad_uniform,) = torch.autograd.grad(uniform, logits)
    torch.testing.assert_close(grad_smoothed, (1 - s) * grad_plain + s * grad_uniform)


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_are_fp32_under_autocast(name):
    logits = torch.randn(1, 19, 8, 8).bfloat16()
    target = torch.randint(0, 19, (1, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LOSSES[name](logits, target).dtype == torch.float32


def test_the_study_s_loss_never_waits_for_the_device(monkeypatch):
    """No host synchronisation in the loss (a GPU step would stall on it): nothing reads a
    device value back (item, bool, any, nonzero of a boolean index, masked_select, which
    torch's own weighted, smoothed cross entropy mean counts with)."""
    logits, target = torch.randn(2, 19, 8, 8, requires_grad=True), torch.randint(0, 19, (2, 8, 8))
    target[0, :2] = 255
    study = CombinedLoss(0.6, 0.1, torch.linspace(0.5, 2.0, 19))
    expected = (dice_loss(logits, target), study(logits, target)[0])

    def forbidden(*args, **kwargs):
        raise AssertionError("a host synchronisation")

    index = torch.Tensor.__getitem__
    for name in ("item", "__bool__", "any", "nonzero", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(
        torch.Tensor, "__getitem__", lambda t, key: forbidden() if torch.is_tensor(key) and key.dtype == torch.bool
        else index(t, key)
    )  # fmt: skip
    monkeypatch.setattr(torch, "masked_select", forbidden)
    with torch.profiler.profile() as profiled:
        again = (dice_loss(logits, target), study(logits, target)[0])
    monkeypatch.undo()
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])
    # what torch itself reads back inside its ops (the profiler sees below Python)
    reads = [e.name for e in profiled.events() if e.name in ("aten::_local_scalar_dense", "aten::masked_select")]
    assert reads == []


def test_cross_entropy_is_torch_s_mean_and_zero_when_every_pixel_is_ignored():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 19, 6, 10, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 19, (2, 6, 10), generator=generator)
    target[1, :2] = 255
    weight = torch.linspace(0.5, 2.0, 19, dtype=torch.float64)
    for w, s in ((None, 0.0), (weight, 0.0), (weight, 0.1), (None, 0.1)):
        expected = torch.nn.functional.cross_entropy(logits, target, w, ignore_index=255, label_smoothing=s)
        torch.testing.assert_close(cross_entropy(logits, target, w, s), expected, rtol=1e-12, atol=0)
    ignored = torch.full_like(target, 255)
    assert cross_entropy(logits, ignored, weight, 0.1).item() == 0.0  # torch: nan


def test_all_ignored_gives_zero_with_a_graph():
    logits = torch.randn(1, 19, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255)
    for loss in (dice_loss(logits, target), ohem_cross_entropy(logits, target)):
        assert loss.item() == 0.0
        loss.backward()


def test_class_weights_from_pixel_counts():
    weights = class_weights_from_pixels([900, 100, 0], kind="inverse")
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[1] / weights[0] == pytest.approx(9.0)
    assert weights[2] == weights.max()
    sqrt = class_weights_from_pixels([900, 100], kind="inverse-sqrt")
    assert sqrt[1] / sqrt[0] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="class weight kind"):
        class_weights_from_pixels([1, 2], kind="nope")


def test_from_config_builds_each_loss_with_the_fold_class_weights():
    pixels = [[300, 100, 0], [600, 0, 0]]  # two training groups, summed
    weights = class_weights_from_pixels([900, 100, 0], "inverse")
    combined = from_config(LossConfig(name="combined", alpha=0.3, class_weights="inverse"), pixels)
    assert isinstance(combined, CombinedLoss) and combined.alpha == 0.3
    torch.testing.assert_close(combined.class_weights, weights)
    plain = from_config(LossConfig(name="ce", label_smoothing=0.0), pixels)
    assert plain.alpha == 1.0 and plain.class_weights is None
    assert plain(LOGITS, TARGET)[0].item() == pytest.approx(cross_entropy(LOGITS, TARGET).item(), rel=1e-6)
    ohem = from_config(LossConfig(name="ohem", ohem_threshold=0.95, ohem_min_kept=1, class_weights="inverse"), pixels)
    assert isinstance(ohem, OHEMLoss)
    value, parts = ohem(LOGITS, TARGET)
    expected = ohem_cross_entropy(LOGITS, TARGET, threshold=0.95, min_kept=1, weight=weights)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6) and set(parts) == {"ohem"}
    with pytest.raises(ValueError, match="choose from combined, ce, ohem"):
        from_config(LossConfig(name="focal"))


def test_an_auxiliary_heads_cross_entropy_is_added_with_its_weight():
    loss = from_config(LossConfig(name="combined", alpha=0.6, label_smoothing=0.1), aux_weight=0.4)
    aux_logits = LOGITS.flip(1)
    total, parts = loss((LOGITS, aux_logits), TARGET)
    main, main_parts = CombinedLoss(0.6, 0.1)(LOGITS, TARGET)
    expected_aux = torch.nn.functional.cross_entropy(aux_logits, TARGET, ignore_index=255)  # plain: no smoothing
    assert total.item() == pytest.approx(main.item() + 0.4 * expected_aux.item(), rel=1e-6)
    assert parts["aux_ce"].item() == pytest.approx(expected_aux.item(), rel=1e-6)
    assert set(parts) == {*main_parts, "aux_ce"}
    # a model without the auxiliary head (or in eval mode) gives plain logits: the loss alone
    assert loss(LOGITS, TARGET)[0].item() == pytest.approx(main.item(), rel=1e-6)
    assert isinstance(from_config(LossConfig(name="ce")), CombinedLoss)  # no wrapper unless asked
