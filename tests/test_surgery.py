"""apply_dropblock / plan / describe / remove_dropblock: API, recipes, placement, errors,
atomicity, fallbacks, on small user-defined CNNs and the paper's ResNet-50s."""

from __future__ import annotations

import copy
import pickle
from collections import Counter

import pytest
import torch
from torch import nn

import dropblock_fx as dbx
from dropblock_fx import DropBlock2d, DropBlock3d, DropBlockNd, Plan, SurgeryError, apply_dropblock, describe, plan
from dropblock_fx import remove_dropblock
from dropblock_fx.recipe import Recipe, StageSpec
from dropblock_fx.testing import fresh_memory

from small_models import NormFree, SmallCNN, TrainBranchNet, WithUntraceable

timm = pytest.importorskip("timm")
tv = pytest.importorskip("torchvision")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*no schedule is attached")]


def dropblocks(model: nn.Module) -> dict[str, DropBlockNd]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DropBlockNd)}


def snapshot(model: nn.Module):
    return (repr(model), [(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()}, dict(model.__dict__).keys())


def same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and list(a[2]) == list(b[2]) and all(
        torch.equal(a[2][k], b[2][k]) for k in a[2])


# ---------------------------------------------------------------------------- placement


@pytest.mark.parametrize("make", [lambda: tv.models.resnet50(), lambda: timm.create_model("resnet50")],
                         ids=["torchvision", "timm"])
def test_paper_placement_resnet50_is_36_modules(make):
    model = apply_dropblock(make(), "paper-resnet50")
    mods = dropblocks(model)
    assert len(mods) == 36
    assert Counter(m.placement.site for m in mods.values()) == {"conv": 18, "conv_last": 9, "shortcut": 9}
    blocks = [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)]
    assert sorted(mods) == sorted(f"{b}.dropblock_{s}" for b in blocks
                                  for s in ("conv1", "conv2", "conv_last", "shortcut"))
    for name, m in mods.items():
        assert type(m) is DropBlock2d
        assert m.placement.stage == int(name[5])
        assert m.target_drop_prob == pytest.approx(0.1 / 4 ** (4 - m.placement.stage))
        assert m.drop_prob == m.target_drop_prob and bool(m.schedule_pending) is True
        assert (m.block_size, m.mask, m.seed_region) == (7, "channel", "valid")
    p = describe(model)
    assert isinstance(p, Plan) and [r.path for r in p.rows] == list(mods)
    assert {r.stage_name for r in p.rows} == {"layer3", "layer4"}


def test_timm_placement_reproduces_drop_block_rate():
    ours = apply_dropblock(timm.create_model("resnet50"), "timm-resnet")
    theirs = timm.create_model("resnet50", drop_block_rate=0.1)
    want = {n: (m.block_size, m.gamma_scale) for n, m in theirs.named_modules() if type(m).__name__ == "DropBlock2d"}
    got = {n: (m.block_size, m.gamma_scale) for n, m in dropblocks(ours).items()}
    assert got == want and len(got) == 9
    assert {(m.placement.site, m.drop_prob, m.mask, m.seed_region) for m in dropblocks(ours).values()} == {
        ("timm", 0.1, "shared", "full")}
    assert set(ours.state_dict()) == set(theirs.state_dict())
    remove_dropblock(ours)
    assert all(type(b.drop_block) is nn.Identity for b in [*ours.layer3, *ours.layer4])


def test_timm_placement_on_byobnet_repvgg():
    """timm puts byobnet's DropBlocks in the .drop slot of a BatchNormAct2d: same positions."""
    ours = apply_dropblock(timm.create_model("repvgg_a2"), "timm-resnet",
                           stages=[{"stage": -2, "block_size": 5, "gamma_scale": 0.25}, {"stage": -1, "block_size": 3}])
    theirs = timm.create_model("repvgg_a2", drop_block_rate=0.1)
    want = {n: (m.block_size, m.gamma_scale) for n, m in theirs.named_modules() if type(m).__name__ == "DropBlock2d"}
    assert {n: (m.block_size, m.gamma_scale) for n, m in dropblocks(ours).items()} == want
    assert all(n.endswith("conv_kxk.bn.drop") for n in want)


def test_small_cnn_sites_and_names():
    model = apply_dropblock(SmallCNN(), {"stages": [3, 4], "sites": ["conv", "conv_last", "shortcut", "block"]},
                            input_size=[3, 64, 64])
    mods = dropblocks(model)
    assert sorted(mods) == sorted(f"stages.{s}.{b}.dropblock_{k}" for s in (2, 3) for b in (0, 1)
                                  for k in ("conv1", "conv_last", "shortcut", "block"))
    assert model.stages[2][0].extra_method() == "still here"


def test_stage_selection_names_negative_fraction_and_overrides():
    m = tv.models.resnet50()
    p = plan(m, {"stages": ["layer4", -2], "sites": ["shortcut"]})
    assert [r.path for r in p.rows] == [f"layer4.{i}.dropblock_shortcut" for i in range(3)] + \
        [f"layer3.{i}.dropblock_shortcut" for i in range(6)] or sorted(r.stage for r in p.rows) == [3] * 6 + [4] * 3
    p = plan(m, "paper-resnet50", stages=[{"stage": 3, "block_fraction": 0.5, "block_size": 5, "mask": "shared"}, 4])
    assert sorted({r.path.rsplit(".", 1)[0] for r in p.rows if r.stage == 3}) == ["layer3.3", "layer3.4", "layer3.5"]
    assert {r.options.mask for r in p.rows if r.stage == 3} == {"shared"}
    assert {r.block_size for r in p.rows if r.stage == 3} == {(5, 5)}
    p = plan(m, "paper-resnet50", drop_prob=0.2, stage_multiplier="none")
    assert {r.target_drop_prob for r in p.rows} == {0.2}
    p = plan(m, Recipe(stages=[StageSpec(stage=4, drop_prob=0.3)], sites=["conv"]))
    assert {r.target_drop_prob for r in p.rows} == {0.3} and len(p.rows) == 6
    with pytest.raises(Exception, match="no stage 7"):
        plan(m, {"stages": [7]})


def test_plan_rows_table_and_pickling():
    m = tv.models.resnet18()
    before = snapshot(m)
    p = plan(m, "paper-resnet50")
    assert same(before, snapshot(m)) and not hasattr(m, "dropblock_plan")
    row = p.rows[0]
    assert (row.stage, row.stage_name, row.resolution, row.kind) == (3, "layer3", (14, 14), "conv")
    assert row.block_size == (7, 7) and 0 < row.expected_drop_prob <= row.target_drop_prob
    text = str(p)
    for word in ("stage", "feature map", "module", "site", "block", "drop rate", "real rate", "layer3.0.dropblock_conv1"):
        assert word in text
    assert pickle.loads(pickle.dumps(p)).rows == p.rows
    assert p.as_dicts()[0]["path"] == "layer3.0.dropblock_conv1"
    # at 7x7 with block 7 (one valid centre) the real rate equals the paper's target
    assert all(r.expected_drop_prob == pytest.approx(0.1) for r in p.rows if r.resolution == (7, 7))


def test_recipe_forms_and_errors(tmp_path):
    m = SmallCNN()
    r = {"stages": [4], "sites": ["conv"], "input_size": [3, 64, 64]}
    a, b = plan(m, r), plan(m, Recipe.model_validate(r))
    assert a.rows == b.rows and len(a.rows) == 2
    path = tmp_path / "r.yaml"
    path.write_text("stages: [4]\nsites: [conv]\ninput_size: [3, 64, 64]\n")
    assert plan(m, str(path)).rows == a.rows
    assert plan(m, "paper-resnet50", input_size=[3, 64, 64]).recipe.name == "paper-resnet50"
    with pytest.raises(Exception, match="nonexistent-recipe"):
        plan(m, "nonexistent-recipe")
    with pytest.raises(Exception, match="not_a_field"):
        plan(m, r, not_a_field=1)
    with pytest.raises(SurgeryError, match="target 'nope'"):
        plan(m, r, target="nope")


def test_default_recipe_and_dropblock3d():
    class Video(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv3d(3, 8, 3, 2, 1), nn.BatchNorm3d(8), nn.ReLU(),
                nn.Conv3d(8, 8, 3, 2, 1), nn.BatchNorm3d(8), nn.ReLU(),
                nn.Conv3d(8, 8, 3, 2, 1), nn.BatchNorm3d(8), nn.ReLU(),
                nn.Conv3d(8, 8, 3, 2, 1), nn.BatchNorm3d(8), nn.ReLU())

        def forward(self, x):
            return self.body(x)

    model = Video().eval()
    x = torch.randn(1, 3, 8, 32, 32)
    ref = model(x)
    apply_dropblock(model, input_size=[3, 8, 32, 32], block_size=3)
    mods = dropblocks(model)
    assert mods and all(type(m) is DropBlock3d for m in mods.values())
    assert set(mods) == {"body.dropblock_6", "body.dropblock_9"}
    assert torch.equal(model(x), ref) and len(model.body) == 12
    model.train()(x).sum().backward()
    assert model.dropblock_plan.recipe.name == "last-two-stages"


# ---------------------------------------------------------------------------- guarantees


def test_apply_twice_raises_and_replace_replaces():
    model = apply_dropblock(SmallCNN(), "paper-resnet50", input_size=[3, 64, 64])
    n = len(dropblocks(model))
    with pytest.raises(SurgeryError, match="already applied"):
        apply_dropblock(model, "paper-resnet50", input_size=[3, 64, 64])
    assert len(dropblocks(model)) == n
    apply_dropblock(model, "paper-resnet50", input_size=[3, 64, 64], stages=[4], replace=True)
    assert {m.placement.stage for m in dropblocks(model).values()} == {4}
    assert describe(model).recipe.stages == [4]


def test_timm_own_dropblock_is_detected():
    model = timm.create_model("resnet18", drop_block_rate=0.1)
    with pytest.raises(SurgeryError, match=r"layer3\.0\.drop_block.*another library"):
        apply_dropblock(model, "paper-resnet50")
    apply_dropblock(model, "paper-resnet50", sites=["shortcut"], keep_foreign=True)
    assert any("foreign" in n for n in describe(model).notes)
    with pytest.raises(SurgeryError, match="no DropBlock plan"):
        describe(timm.create_model("resnet18"))


def test_atomic_failure_leaves_model_unchanged(monkeypatch):
    import dropblock_fx.surgery.realise as realise_mod
    from dropblock_fx import DropBlockNd

    model = tv.models.resnet50()
    before = snapshot(model)
    real = realise_mod.splice_graph
    calls = []

    def flaky(m, source):
        if any(isinstance(c, DropBlockNd) for c in m.children()):  # apply, not the plan's run check
            calls.append(m)
        if len(calls) == 5:
            raise RuntimeError("injected failure")
        return real(m, source)

    monkeypatch.setattr(realise_mod, "splice_graph", flaky)
    with pytest.raises(SurgeryError, match=r"layer3\.4: RuntimeError: injected failure"):
        apply_dropblock(model, "paper-resnet50")
    assert same(before, snapshot(model)) and not dropblocks(model)


def test_untraceable_block_falls_back_to_norm_sites():
    model = WithUntraceable().eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    apply_dropblock(model, {"stages": [2, 3], "sites": ["conv", "block", "shortcut"]}, input_size=[3, 64, 64])
    p = describe(model)
    assert any(n.startswith("odd: no graph") and "Proxy" in n for n in p.notes)
    by_path = {r.path: r for r in p.rows}
    assert by_path["odd.bn.dropblock"].mechanism == "after-norm"
    assert by_path["odd.dropblock"].mechanism == "after-block"
    assert torch.equal(model(x), ref)
    model.train()(x).sum().backward()
    remove_dropblock(model)
    assert not dropblocks(model) and type(model.odd.bn) is nn.BatchNorm2d


def test_block_with_train_only_branch_keeps_both_behaviours():
    torch.manual_seed(0)
    orig = TrainBranchNet()
    model = copy.deepcopy(orig)
    apply_dropblock(model, {"stages": [3, 4], "sites": ["conv", "shortcut"]}, input_size=[3, 64, 64])
    assert any("train and eval" in n for n in describe(model).notes)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.eval()(x), orig.eval()(x))
    for m in dropblocks(model).values():
        m.drop_prob = 0.0
    assert torch.equal(model.train()(x), orig.train()(x))  # the y * 2 of train mode is kept


def test_norm_free_network_sites_after_activation():
    model = NormFree().eval()
    p = plan(model, {"stages": [2, 3], "sites": ["conv"]}, input_size=[3, 64, 64])
    assert [(r.path, r.anchor) for r in p.rows] == [
        ("features.dropblock_9", "after 9 > 10"),
        ("features.dropblock_12", "after 12 > 13"),
    ]
    assert any("no norm layers" in n for n in p.notes)


def test_train_mode_only_planned_sites_drop():
    torch.manual_seed(0)
    orig = tv.models.resnet50()
    model = apply_dropblock(copy.deepcopy(orig), "paper-resnet50", input_size=[3, 64, 64])
    mods = dropblocks(model)
    calls = Counter()
    for name, m in mods.items():
        m.register_forward_hook(lambda mod, i, o, name=name: calls.update([name]))
        m.drop_prob = 0.0
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.train()(x), orig.train()(x))  # nothing else changed in train mode
    assert calls == Counter({n: 1 for n in mods})
    target = "layer4.1.dropblock_conv2"
    mods[target].drop_prob = 0.5
    seen, inputs = {}, {}
    for name, m in mods.items():  # the input as it came in: a module that owns it writes into it
        m.register_forward_pre_hook(lambda mod, i, name=name: inputs.__setitem__(name, i[0].clone()))
        m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, torch.equal(inputs[name], o)))
    model(x).sum().backward()
    assert [n for n, unchanged in seen.items() if not unchanged] == [target]


def test_torch_compile_fullgraph_train_and_eval():
    model = apply_dropblock(SmallCNN(), "paper-resnet50", input_size=[3, 64, 64])
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    model.eval()
    assert torch.equal(compiled(x), model(x))
    model.train()
    assert compiled(x).shape == (2, 10)
    for m in dropblocks(model).values():
        m.drop_prob = 0.05  # no recompilation needed (checked by the modules' own tests)
    assert compiled(x).shape == (2, 10)


def test_class_methods_and_timm_api_preserved():
    model = timm.create_model("resnet50")
    info, cfg = model.feature_info, model.pretrained_cfg
    apply_dropblock(model, "paper-resnet50")
    assert type(model) is timm.models.resnet.ResNet
    assert model.feature_info is info and model.pretrained_cfg is cfg
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    assert model.forward_head(model.forward_features(x)).shape == (1, 1000)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    model.layer3[0].zero_init_last()  # block methods too


def test_public_names():
    for name in ("apply_dropblock", "remove_dropblock", "describe", "plan", "Plan", "PlanRow", "SurgeryError",
                 "register_norm"):
        assert hasattr(dbx, name) and name in dbx.__all__


def test_nfnet_norm_free_blocks_are_units():
    """timm's NormFreeBlock is a no-trace leaf for other tracers, but a unit of its own here."""
    model = timm.create_model("nfnet_l0").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    apply_dropblock(model)
    p = describe(model)
    # 36 in the blocks, and the head's final_conv -> final_act in the model's own forward
    assert Counter(r.kind for r in p.rows) == {"conv": 37, "conv_last": 9, "shortcut": 9}
    rows = {r.path: r for r in p.rows}
    assert rows["stages.2.0.dropblock_conv1"].anchor == "after conv1 > act2"
    assert any("no norm layers" in n for n in p.notes)
    assert rows["dropblock_final_conv"].anchor == "after final_conv > final_act"
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_bad_overrides_raise_recipe_error_and_leave_the_model_alone():
    import copy

    import torchvision

    from dropblock_fx import RecipeError

    model = torchvision.models.resnet18()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeError, match="block_size"):
        dbx.apply_dropblock(model, "paper-resnet50", block_size=0)
    with pytest.raises(RecipeError, match="block_size"):
        dbx.apply_dropblock(model, {"stages": [3], "block_size": "x"})
    assert not any(isinstance(m, dbx.DropBlockNd) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_stride_with_no_conv_is_not_a_stage():
    """VGG ends with a max-pool at stride 32: no conv runs there, so it is not a stage, and the
    default recipe's two deepest stages are the two deepest groups of convs (2 conv+BN+ReLU each
    in VGG11-bn), not one conv group and a pool."""
    m = tv.models.vgg11_bn().eval()
    p = plan(m, input_size=[3, 64, 64])
    assert [s.index for s in p.stages] == [0, 1, 2, 3]  # the stride-32 output of features.28 is not one
    assert sorted((r.stage, r.kind) for r in p.rows) == [(2, "conv")] * 2 + [(3, "conv")] * 2


def test_plan_rows_are_in_forward_order():
    """Rows list the DropBlock modules in the order a forward runs them (ResNet-50, paper)."""
    model = apply_dropblock(tv.models.resnet50(), "paper-resnet50").train()
    seen: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, DropBlockNd):
            m.register_forward_hook(lambda mod, i, o, name=name: seen.append(name))
    model(torch.randn(2, 3, 64, 64))
    rows = [r.path for r in describe(model).rows]
    assert seen == rows and len(rows) == 36


@pytest.mark.parametrize("make", [lambda: __import__("timm").create_model("resnet18"),
                                  lambda: __import__("torchvision").models.resnet50()])
def test_rewritten_blocks_ask_for_no_more_memory_than_the_originals(make):
    """At rate 0 a training step of the rewritten model allocates exactly what the original's
    does, forward and backward: the blocks' ``x += shortcut`` stays in place (traced by FX as
    ``x + shortcut`` it costs a feature map per block and step), with the same outputs and
    gradients."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = make().train()
    model = apply_dropblock(copy.deepcopy(ref), "paper-resnet50")
    assert sum(isinstance(m, DropBlock2d) for m in model.modules()) > 0
    for m in model.modules():
        if isinstance(m, DropBlock2d):
            m.drop_prob = 0.0
    x = torch.randn(2, 3, 64, 64)

    def step(net):
        out = net(x)
        out.sum().backward()
        return out

    with pytest.warns(UserWarning):  # the recipe's schedule is not attached: it says so once
        step(model)
    model.zero_grad(set_to_none=True)
    step(ref)
    ref.zero_grad(set_to_none=True)
    assert fresh_memory(lambda: step(model)) == fresh_memory(lambda: step(ref))
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    out_m, out_r = step(model), step(ref)
    assert torch.equal(out_m, out_r)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), ref.parameters()))
