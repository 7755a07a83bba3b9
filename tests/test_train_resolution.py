"""The resolution a model trains at against the one its plan was made at: one warning per
model, ``describe`` at the seen maps, a planning note for maps too small for the block."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import dropblock_fx as dbx
from dropblock_fx.modules import Placement, is_inserted
from dropblock_fx.op.options import DropBlockOptions
from dropblock_fx.surgery.watch import ModelWatch
from dropblock_fx.surgery.settings import StageSettings, small_map_note

pytestmark = pytest.mark.usefixtures("one_thread")

MARK = "training feature maps differ from the plan"
MAKERS = {"torchvision": lambda: torchvision.models.resnet18(num_classes=4),
          "timm": lambda: timm.create_model("resnet18", pretrained=False, num_classes=4)}


def applied(maker: str = "torchvision", **overrides) -> nn.Module:
    torch.manual_seed(0)
    return dbx.apply_dropblock(MAKERS[maker](), "paper-resnet50", schedule=None, **overrides)


def ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if MARK in str(w.message)]


def train_steps(model: nn.Module, size: int, steps: int = 3, batch: int = 2) -> list[str]:
    """``steps`` optimiser steps at ``size`` px; the messages of the resolution warnings."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            loss = model(torch.randn(batch, 3, size, size)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ours(caught)


def inserted(model: nn.Module) -> dict[str, dbx.DropBlockNd]:
    return {n: m for n, m in model.named_modules() if is_inserted(m)}


def exact_rate(p: float, spatial: tuple[int, ...], block_size: int) -> float:
    """The expected dropped fraction of the paper's DropBlock with valid seeds, counted cell by
    cell: gamma = p / k^2 * S^2 / (S - k + 1)^2 (per side, block clipped to the map), and a
    cell covered by v seed positions is kept with probability (1 - gamma)^v."""
    k = [min(block_size, s) for s in spatial]
    grid = [s - b + 1 for s, b in zip(spatial, k)]
    gamma = min(1.0, p * math.prod(spatial) / (math.prod(k) * math.prod(grid)))
    cover = np.zeros(spatial)
    for seed in np.ndindex(*grid):
        cover[tuple(slice(i, i + b) for i, b in zip(seed, k))] += 1
    return float(np.mean(1.0 - (1.0 - gamma) ** cover))


# ----------------------------------------------------------------- the warning


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_training_at_another_size_warns_once_in_one_line(maker):
    model = applied(maker)
    msgs = train_steps(model, 32, steps=3) + train_steps(model, 48, steps=2)
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    assert "\n" not in msg and "input_size=" in msg and "input_size=(3, 224, 224)" in msg
    assert "planned 14x14, seen 2x2" in msg and "layer3.0.dropblock_conv1" in msg
    seen = {n: m.seen_resolution for n, m in inserted(model).items()}
    assert seen["layer4.1.dropblock_shortcut"] == (2, 2)  # the latest map seen (48 px)
    assert all(s is not None for s in seen.values())


def test_one_warning_per_model():
    a, b = applied(), applied()
    assert len(train_steps(a, 32)) == 1
    assert len(train_steps(a, 32)) == 0
    assert len(train_steps(b, 32)) == 1  # another apply_dropblock call, another model


def test_training_at_the_planned_size_warns_nothing():
    model = applied()
    assert train_steps(model, 224, steps=2, batch=1) == []
    assert all(m.seen_resolution is None for m in inserted(model).values())
    assert dbx.describe(model) is model.dropblock_plan


def test_eval_at_another_size_warns_nothing():
    model = applied().eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(torch.randn(2, 3, 32, 32))
    assert ours(caught) == []
    assert all(m.seen_resolution is None for m in inserted(model).values())


def test_planned_at_the_training_size_warns_nothing():
    model = applied(input_size=[3, 32, 32], stages=[2, 3])
    assert train_steps(model, 32) == []


def test_placement_knows_the_planned_map():
    model = applied()
    mods = inserted(model)
    for row in dbx.describe(model).rows:
        assert mods[row.path].placement.resolution == row.resolution
        assert mods[row.path].placement.path == row.path


def test_hand_made_modules_compare_nothing():
    m = dbx.DropBlock2d(0.1, 3)
    m.placement = Placement(4, "conv", 0.1)  # no path, no resolution, no watch: the defaults
    assert m.placement.resolution == () and m.placement.watch is None
    m.train()(torch.randn(2, 4, 8, 8))
    assert m.seen_resolution is None
    m.placement = Placement(4, "conv", 0.1, watch=ModelWatch((3, 224, 224)))  # a watch, no planned map: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(2, 4, 8, 8))
    assert m.seen_resolution is None


def test_a_module_shared_across_sizes_is_not_compared():
    """A head called on two levels sees two maps in every forward, at the planned size too."""

    class SharedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
            self.down = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())

        def forward(self, x):
            a = self.stem(x)
            return self.head(a).mean() + self.head(self.down(a)).mean()

    model = dbx.apply_dropblock(SharedHead(), stages=[0, 1], input_size=[3, 32, 32], schedule=None)
    assert "head.dropblock_0" in inserted(model)
    assert inserted(model)["head.dropblock_0"].placement.resolution == ()  # several maps: none to compare
    assert inserted(model)["stem.dropblock_0"].placement.resolution == (16, 16)
    assert inserted(model)["head.dropblock_0"].placement.watch is inserted(model)["stem.dropblock_0"].placement.watch
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(2, 3, 32, 32))
    assert ours(caught) == []


# ----------------------------------------------------------------- describe


@pytest.mark.parametrize("size", [32, 448])
def test_describe_gives_the_rates_at_the_seen_maps(size):
    model = applied()
    train_steps(model, size, steps=1, batch=2 if size < 64 else 1)
    stored = model.dropblock_plan
    p = dbx.describe(model)
    assert p is not stored and len(p.rows) == len(stored.rows)
    for row, old in zip(p.rows, stored.rows):
        opts = row.options
        assert (opts.seed_region, opts.gamma_scale, opts.calibrate) == ("valid", 1.0, False)
        scale = size / 224
        expect = tuple(max(1, round(s * scale)) for s in row.resolution)
        assert row.seen_resolution == expect, row
        assert row.seen_block_size == tuple(min(7, s) for s in expect)
        assert row.seen_expected_drop_prob == pytest.approx(exact_rate(row.target_drop_prob, expect, 7), abs=1e-9)
        if size == 32:  # a block over the whole map: the real rate is the target
            assert row.seen_expected_drop_prob == pytest.approx(row.target_drop_prob, abs=1e-12)
        assert old.seen_resolution == () and old.seen_expected_drop_prob is None  # the stored plan is unchanged
        assert "seen_resolution" not in old.as_dict() and row.as_dict()["seen_resolution"] == expect
    text = str(p)
    assert "seen real rate" in text and "seen block" in text and "seen real rate" not in str(stored)
    assert any("trained on other feature maps" in n for n in p.notes)
    assert not any("trained on other feature maps" in n for n in stored.notes)


# ----------------------------------------------------------------- planning note


def test_plan_notes_stages_too_small_for_the_block():
    p = dbx.plan(torchvision.models.resnet18(), stages=[3, 4], missing_stages="skip", input_size=[3, 32, 32])
    note = next(n for n in p.notes if n.startswith("stage 3 (layer3):"))
    assert note.startswith("stage 3 (layer3): 2x2 at input_size (3, 32, 32), smaller than block_size 7")
    assert "channel dropout" in note and "stages=" in note
    # layer4 collapses the map to 1x1: still stage 4 (stride 32), with a note and no site on it
    assert [s.resolution for s in p.stages if s.index == 4] == [(1, 1)]
    note4 = next(n for n in p.notes if n.startswith("stage 4 (layer4): 1x1 at input_size (3, 32, 32)"))
    assert "no DropBlock" in note4 and p.count(stage=4) == 0
    p64 = dbx.plan(torchvision.models.resnet18(), stages=[3, 4], input_size=[3, 64, 64])
    assert sum(n.startswith(("stage 3 (layer3): 4x4", "stage 4 (layer4): 2x2")) for n in p64.notes) == 2


def test_plan_at_the_paper_size_has_no_such_note():
    """ResNet-50's 7x7 layer4 with block 7 is the paper's own setting: not clipped, no note."""
    p = dbx.plan(torchvision.models.resnet50(), "paper-resnet50")
    assert not any("block_size" in n or "channel dropout" in n for n in p.notes), p.notes


def test_small_map_note_cases():
    from dropblock_fx.graph.stages import Stage

    def note(res, block=7, **opts):
        options = DropBlockOptions(block, **opts)
        return small_map_note(StageSettings(Stage(4, "s4", 32, res), 0.1, block, frozenset({"conv"}), 1.0, options),
                              (3, 32, 32))

    assert note((1, 1)).startswith("stage 4 (s4): 1x1 at input_size (3, 32, 32): its 1x1 maps get no DropBlock")
    assert "no DropBlock" in note((1, 1), block=1)
    assert note((7, 7)) == "" and note((14, 14)) == "" and note((2, 2), block=1) == ""
    assert "whole-map dropout" in note((3, 3), mask="shared")
    assert "clipped to 3x3" in note((3, 3), seed_region="full")
    assert "clipped to 7x4" in note((14, 4))


# ----------------------------------------------------------------- pickling and removal


def test_pickle_and_copy_after_the_warning():
    model = applied()
    assert len(train_steps(model, 32, steps=1)) == 1
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for clone in (loaded, pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert train_steps(clone, 32, steps=1) == []  # that model has warned
        p = dbx.describe(clone)
        assert p.rows[-1].seen_resolution == (1, 1)
        watches = {id(m.placement.watch) for m in inserted(clone).values()}
        assert len(watches) == 1  # still one watch for the whole model
    assert pickle.loads(pickle.dumps(dbx.describe(model))).rows[-1].seen_resolution == (1, 1)


def test_remove_dropblock_after_training_elsewhere_is_bit_identical_in_eval():
    model = applied()
    train_steps(model, 32, steps=2)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model(x)
    state = copy.deepcopy(model.state_dict())
    dbx.remove_dropblock(model)
    assert not any(isinstance(m, dbx.DropBlockNd) for m in model.modules())
    assert "dropblock_plan" not in vars(model)
    plain = torchvision.models.resnet18(num_classes=4)
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(model(x), before)
        assert torch.equal(plain.eval()(x), before)
    assert dbx.apply_dropblock(model, "paper-resnet50", schedule=None) is model  # and it applies again
