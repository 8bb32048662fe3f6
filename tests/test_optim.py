"""seg/recipe/optim.py: the optimizer a config builds (fused, two groups), and
tools/bench_optimizer.py that measures its implementation against torch's others."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from seg.recipe.config import OptimConfig
from seg.recipe.optim import OPTIMIZERS, from_config
from tools.bench_optimizer import main as bench_optimizer


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_is_torch_s_fused_one_with_the_backbone_s_rate_scaled(name: str):
    model = Tiny()
    optimizer = from_config(OmegaConf.structured(OptimConfig(name=name, lr=0.1, backbone_lr_mult=0.5)), model)
    assert isinstance(optimizer, OPTIMIZERS[name])
    assert [(g["lr"], g["fused"], len(g["params"])) for g in optimizer.param_groups] == [
        (0.05, True, 2),
        (0.1, True, 2),
    ]
    before = model.head.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # the fused kernel exists for this device
    assert not torch.equal(model.head.weight, before)


def test_a_state_saved_by_torch_s_loop_resumes_with_the_loop():
    """A run started before seg chose fused kernels continues as it began."""
    model = Tiny()
    groups = [{"params": list(model.backbone.parameters())}, {"params": list(model.head.parameters())}]
    old = torch.optim.Adam(groups, lr=0.1, foreach=False)
    model(torch.ones(1, 3)).sum().backward()
    old.step()
    resumed = from_config(OmegaConf.structured(OptimConfig(lr=0.1)), model)
    resumed.load_state_dict(old.state_dict())
    assert [(g["fused"], g["foreach"]) for g in resumed.param_groups] == [(None, False), (None, False)]


def test_the_benchmark_prints_each_implementation_and_how_far_it_ends_from_the_loop(capsys):
    assert bench_optimizer(["--depth", "18", "--optimizers", "adam", "sgd", "--steps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:2]): line.split() for line in lines[2:]}
    assert set(rows) == {(o, i) for o in ("adam", "sgd") for i in ("loop", "foreach", "fused")}
    assert float(rows[("adam", "loop")][-1]) == 0.0  # the loop against itself
    assert all(float(rows[(o, "fused")][-1]) < 1e-5 for o in ("adam", "sgd"))  # the last bits, no more
    with pytest.raises(SystemExit) as refused:
        bench_optimizer(["--steps", "0"])
    assert refused.value.code == 2
