"""Built-in recipes applied by the surgery layer to the models they are meant for, and
schedules driving the modules it inserts. Skipped only while ``apply_dropblock`` does not
exist yet."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

import dropblock_fx as dbx
from dropblock_fx import DropBlockNd, attach_schedule, load_recipe
from dropblock_fx.recipe import validate_recipe

apply_dropblock = getattr(dbx, "apply_dropblock", None)
if apply_dropblock is None:
    surgery = pytest.importorskip("dropblock_fx.surgery")
    apply_dropblock = getattr(surgery, "apply_dropblock", None)
    if apply_dropblock is None:
        pytest.skip("dropblock_fx.apply_dropblock does not exist yet", allow_module_level=True)

timm = pytest.importorskip("timm")
tv = pytest.importorskip("torchvision")


def dropblocks(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, DropBlockNd)}


def block_of(name: str) -> str:
    """``layer3.4.dropblock_conv1`` -> ``layer3.4``."""
    return ".".join(name.split(".")[:2])


@pytest.fixture(scope="module")
def paper_tv_resnet50():
    return apply_dropblock(tv.models.resnet50(), "paper-resnet50")


def test_paper_resnet50_placement_and_contract(paper_tv_resnet50):
    model = paper_tv_resnet50
    mods = dropblocks(model)
    assert len(mods) == 36  # 4 sites x (6 + 3) bottlenecks
    assert {block_of(n).split(".")[0] for n in mods} == {"layer3", "layer4"}
    assert Counter(m.placement.site for m in mods.values()) == {"conv": 18, "conv_last": 9, "shortcut": 9}
    for m in mods.values():
        assert m.placement.stage in (3, 4) and m.block_size == 7 and m.mask == "channel"
        assert m.target_drop_prob == pytest.approx({3: 0.025, 4: 0.1}[m.placement.stage])
        assert m.drop_prob == m.target_drop_prob and bool(m.schedule_pending) is True
    assert model.dropblock_plan.recipe == load_recipe("paper-resnet50")


def test_paper_resnet50_schedule_after_50_of_100_steps(paper_tv_resnet50):
    model = paper_tv_resnet50
    sched = attach_schedule(model, total_steps=100)
    assert not any(m.schedule_pending for m in dropblocks(model).values())
    assert {m.drop_prob for m in dropblocks(model).values()} == {0.0}
    sched.step(50)
    by_group = {g: {round(m.drop_prob, 12) for m in dropblocks(model).values() if m.placement.stage == g} for g in (3, 4)}
    assert by_group == {3: {0.0125}, 4: {0.05}}
    sched.step(50)
    assert {round(m.drop_prob, 12) for m in dropblocks(model).values()} == {0.025, 0.1}
    sched.detach()


def test_paper_resnet50_optimizer_hook_and_warning_on_timm_resnet50():
    model = apply_dropblock(timm.create_model("resnet50"), "paper-resnet50")
    assert len(dropblocks(model)) == 36
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="no schedule is attached"):
        model.train()(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = attach_schedule(model, total_steps=4, optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(x)  # scheduled now: no warning
        for _ in range(2):
            opt.step()
    assert sched.count == 2
    assert {round(m.drop_prob, 12) for m in dropblocks(model).values()} == {0.0125, 0.05}


def test_timm_resnet_matches_timm_drop_block_rate():
    ours = apply_dropblock(timm.create_model("resnet50"), "timm-resnet")
    theirs = timm.create_model("resnet50", drop_block_rate=0.1)
    theirs_mods = {n: m for n, m in theirs.named_modules() if type(m).__name__ == "DropBlock2d"}
    mods = dropblocks(ours)
    assert sorted(block_of(n) for n in mods) == sorted(block_of(n) for n in theirs_mods)
    for name, m in mods.items():
        twin = theirs_mods[block_of(name) + ".drop_block"]
        assert (m.block_size, m.gamma_scale, m.drop_prob) == (twin.block_size, twin.gamma_scale, twin.drop_prob)
        assert m.mask == "shared" and m.seed_region == "full" and m.schedule_pending is False


@pytest.mark.parametrize(
    "make",
    [
        lambda: timm.create_model("efficientnet_b0"),
        lambda: timm.create_model("mobilenetv3_large_100"),
        lambda: timm.create_model("convnext_atto"),
        lambda: timm.create_model("regnetx_002"),
        lambda: tv.models.densenet121(),
        lambda: tv.models.mobilenet_v3_large(),
    ],
    ids=["efficientnet_b0", "mobilenetv3_large_100", "convnext_atto", "regnetx_002", "tv_densenet121",
         "tv_mobilenet_v3_large"],
)
def test_last_two_stages_on_generic_cnns(make):
    model = apply_dropblock(make(), "last-two-stages")
    mods = dropblocks(model)
    assert mods, "no DropBlock placed"
    stages = {m.placement.stage for m in mods.values()}
    assert stages == {max(stages) - 1, max(stages)}
    deepest = max(stages)
    for m in mods.values():  # paper multiplier: the next-to-last stage at a quarter
        assert m.target_drop_prob == pytest.approx(0.1 / 4 ** (deepest - m.placement.stage))
    sched = attach_schedule(model, total_steps=10)
    sched.step(5)
    assert {round(m.drop_prob, 12) for m in mods.values()} == {0.0125, 0.05}


def test_last_two_stages_is_the_default():
    model = apply_dropblock(timm.create_model("mobilenetv3_large_100"))
    assert model.dropblock_plan.recipe == load_recipe("last-two-stages")


class _Isotropic(torch.nn.Module):
    """ConvMixer-like: a patchify stem, then every block at one resolution (one stage)."""

    def __init__(self, c: int = 16, depth: int = 3):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, c, 4, 4), nn.GELU(), nn.BatchNorm2d(c))
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.GELU(), nn.BatchNorm2d(c),
                          nn.Conv2d(c, c, 1), nn.GELU(), nn.BatchNorm2d(c))
            for _ in range(depth)
        ])

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


def test_default_recipe_fits_a_single_stage_network():
    model = _Isotropic().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    p = dbx.plan(model, input_size=[3, 32, 32])
    assert [s.index for s in p.stages] == [1]  # stride 4: one stage, numbered 1
    assert {r.stage for r in p.rows} == {1} and len(p.rows) == 3 * 2 + 1  # 2 norms per block + stem's
    assert {r.target_drop_prob for r in p.rows} == {0.1}  # the deepest stage: the full rate
    assert any("stage(s) -2 skipped" in n and "missing_stages: skip" in n for n in p.notes), p.notes
    out = apply_dropblock(model, input_size=[3, 32, 32])
    assert torch.equal(out(x), ref)
    # a stage list the user gives is exact again: -2 is an error naming the one stage
    with pytest.raises(dbx.RecipeError, match=r"no stage -2.*-1 \.\. -1 from the deepest"):
        dbx.plan(_Isotropic(), stages=[-2, -1], input_size=[3, 32, 32])
    # ... unless it asks for skipping too; skipping everything is still an error
    assert len(dbx.plan(_Isotropic(), stages=[-2, -1], missing_stages="skip", input_size=[3, 32, 32]).rows) == 7
    with pytest.raises(dbx.RecipeError, match="no stage 3"):
        dbx.plan(_Isotropic(), stages=[3, 4], missing_stages="skip", input_size=[3, 32, 32])


def test_missing_stages_skip_in_a_recipe_file(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("stages: [3, 4, 5]\nmissing_stages: skip\nkeep_prob: 0.9\nstage_multiplier: paper\n")
    p = dbx.plan(tv.models.resnet18(), str(path), input_size=[3, 64, 64])
    assert {r.stage for r in p.rows} == {3, 4}
    assert {r.target_drop_prob for r in p.rows if r.stage == 4} == {0.1}  # deepest *selected*: 4
    assert any("stage(s) 5 skipped" in n for n in p.notes)
    with pytest.raises(dbx.RecipeError, match="missing_stages"):
        validate_recipe({"stages": [3], "missing_stages": "ignore"})


def test_amoebanet_style_last_half_of_blocks():
    model = apply_dropblock(tv.models.resnet50(), "amoebanet-style")
    mods = dropblocks(model)
    assert sorted({block_of(n) for n in mods}) == ["layer3.3", "layer3.4", "layer3.5",
                                                  "layer4.0", "layer4.1", "layer4.2"]
    assert {m.block_size for m in mods.values()} == {11}
    assert {round(m.target_drop_prob, 12) for m in mods.values()} == {0.1}


def test_amoebanet_style_on_a_nas_cell_network():
    # NASNet-A (timm nasnetalarge) is AmoebaNet's family: stacks of 6 normal cells, 331 px.
    model = apply_dropblock(timm.create_model("nasnetalarge"), "amoebanet-style")
    mods = dropblocks(model)
    cells = {n.split(".")[0] for n in mods}
    normal = sorted(int(c.split("_")[1]) for c in cells if c.startswith("cell_"))
    assert normal == list(range(8, 18))  # about the last half of the 18 normal cells
    assert {m.block_size for m in mods.values()} == {11}
    assert {"conv", "conv_last", "shortcut"} == {m.placement.site for m in mods.values()}


@pytest.fixture(scope="module")
def retinanet():
    return lambda: tv.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)


def test_retinanet_coco_all_four_groups_constant(retinanet):
    model = apply_dropblock(retinanet(), "retinanet-coco")
    mods = dropblocks(model)
    assert all(n.startswith("backbone.body.layer") for n in mods)
    assert Counter(m.placement.stage for m in mods.values()) == {1: 12, 2: 16, 3: 24, 4: 12}
    assert {round(m.drop_prob, 12) for m in mods.values()} == {0.1}
    assert not any(m.schedule_pending for m in mods.values())  # constant: nothing to warn about


def test_ppyolo_neck_only_in_the_fpn(retinanet):
    model = apply_dropblock(retinanet(), "ppyolo-neck")
    mods = dropblocks(model)
    assert mods and all(n.startswith("backbone.fpn.") for n in mods)
    assert Counter(m.placement.stage for m in mods.values()) == {2: 2, 3: 2, 4: 2}  # P3-P5, not P6/P7
    assert {m.block_size for m in mods.values()} == {3}
    assert {round(m.drop_prob, 12) for m in mods.values()} == {0.1}
    assert not any(m.schedule_pending for m in mods.values())
