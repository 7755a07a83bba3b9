"""timm integration: create_model, <arch>_dropblock names, local weights, drop_block_rate parity."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import DropBlock2d as TimmDropBlock2d
from torch import nn

import dropblock_fx.timm as dbt
from dropblock_fx.integrations import timm as timm_integration
from dropblock_fx import DropBlock2d, DropBlockNd, expected_drop_rate, paper_gamma
from dropblock_fx.surgery import SurgeryError, apply_dropblock, describe, remove_dropblock

SMALL = dict(input_size=[3, 64, 64])  # plan at 64 px: cheap


def _ours(model: nn.Module) -> dict[str, DropBlockNd]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DropBlockNd)}


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def resnet10t_file(tmp_path_factory):
    """A resnet10t state_dict on local disk, standing in for downloaded pretrained weights."""
    torch.manual_seed(1)
    m = timm.create_model("resnet10t")
    path = tmp_path_factory.mktemp("weights") / "resnet10t.pth"
    torch.save(m.state_dict(), path)
    return path, m


def test_create_model_passes_timm_arguments_and_applies_recipe():
    plain = timm.create_model("resnet10t", num_classes=7, in_chans=1)
    m = dbt.create_model("resnet10t", "paper-resnet50", num_classes=7, in_chans=1)
    assert type(m) is type(plain) and m.num_classes == 7 and m.conv1[0].in_channels == 1
    assert m.pretrained_cfg == plain.pretrained_cfg
    assert m.feature_info == plain.feature_info
    plan = describe(m)
    assert plan.recipe.name == "paper-resnet50" and len(plan.rows) == len(_ours(m)) > 0
    assert {r.stage for r in plan.rows} == {3, 4}
    for name in ("forward_features", "forward_head", "reset_classifier"):
        assert callable(getattr(m, name))


def test_create_model_default_recipe_is_last_two_stages():
    m = dbt.create_model("resnet10t", recipe_overrides=SMALL)
    assert describe(m).recipe.name == "last-two-stages"


def test_weights_load_first_then_recipe(resnet10t_file):
    path, ref = resnet10t_file
    x = torch.randn(2, 3, 64, 64)
    for kwargs in (dict(checkpoint_path=str(path)),
                   dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))):
        m = dbt.create_model("resnet10t", recipe_overrides=SMALL, **kwargs)
        assert _ours(m)
        _same_state(m, ref)
        with torch.no_grad():
            assert torch.equal(m.eval()(x), ref.eval()(x))


def test_registered_names_are_listed_and_build():
    names = timm.list_models("*_dropblock")
    for n in ("resnet18_dropblock", "resnet50_dropblock", "resnet10t_dropblock", "efficientnet_b0_dropblock",
              "convnext_atto_dropblock", "mobilenetv3_large_100_dropblock"):
        assert n in names
    assert not any(n.endswith("_dropblock_dropblock") for n in names)
    # other tests (doctests) may register names with other suffixes
    assert {n for n in dbt.registered() if n.endswith("_dropblock")} <= set(names)
    assert "resnet50_dropblock.a1_in1k" in timm.list_models("resnet50_dropblock", pretrained=True)
    m = timm.create_model("resnet10t_dropblock", num_classes=5, recipe_overrides=SMALL)
    assert m.num_classes == 5 and describe(m).recipe.name == "last-two-stages"
    assert m.pretrained_cfg["architecture"] == "resnet10t_dropblock"
    m2 = timm.create_model("resnet10t_dropblock", recipe="timm-resnet")
    assert {r.kind for r in describe(m2).rows} == {"timm"}


def test_registered_pretrained_tag_resolves_and_loads_local_file(resnet10t_file):
    path, ref = resnet10t_file
    base_cfg = timm.create_model("resnet10t.c3_in1k").pretrained_cfg
    m = timm.create_model("resnet10t_dropblock.c3_in1k", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), recipe_overrides=SMALL)
    registry_cfg = timm.models.get_pretrained_cfg("resnet10t_dropblock.c3_in1k")
    assert registry_cfg.hf_hub_id == timm.models.get_pretrained_cfg("resnet10t.c3_in1k").hf_hub_id  # base weights
    assert registry_cfg.architecture == "resnet10t_dropblock" and registry_cfg.tag == "c3_in1k"
    assert m.pretrained_cfg["tag"] == "c3_in1k"
    assert m.pretrained_cfg["architecture"] == "resnet10t_dropblock"
    assert {k: v for k, v in m.pretrained_cfg.items() if k not in ("architecture", "file")} == \
        {k: v for k, v in base_cfg.items() if k not in ("architecture", "file")}
    assert _ours(m)
    _same_state(m, ref)
    # timm's checkpoint_path is loaded after the entrypoint: state keys are unchanged, so it works too
    m2 = timm.create_model("resnet10t_dropblock", checkpoint_path=str(path), recipe_overrides=SMALL)
    _same_state(m2, ref)


def test_registered_features_only_keeps_feature_info():
    plain = timm.create_model("resnet10t", features_only=True)
    m = timm.create_model("resnet10t_dropblock", features_only=True, recipe_overrides=SMALL)
    assert m.feature_info.channels() == plain.feature_info.channels()
    assert m.feature_info.reduction() == plain.feature_info.reduction()
    assert _ours(m)
    feats = m.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == plain.feature_info.channels()


def test_register_custom_recipe_and_suffix():
    assert dbt.register("resnet10t", "timm-resnet", suffix="_tdbtest", overwrite=True) == ["resnet10t_tdbtest"]
    assert "resnet10t_tdbtest" in timm.list_models("*_tdbtest")
    m = timm.create_model("resnet10t_tdbtest")
    assert describe(m).recipe.name == "timm-resnet"
    assert dbt.register("resnet10t", "timm-resnet", suffix="_tdbtest") == []  # exists: skipped
    with pytest.raises(ValueError, match="no model"):
        dbt.register("not_a_model_xyz")
    with pytest.raises(ValueError, match="suffix"):
        dbt.register("resnet10t", suffix="")


# ------------------------------------------------------------------ timm's drop_block_rate


def _call_sequence(model: nn.Module) -> list[tuple]:
    """Leaf module calls in forward order; DropBlock calls (timm's or ours) as their settings."""
    seq: list[tuple] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, TimmDropBlock2d):
            s = timm_integration._settings(m)
            entry = ("dropblock", name, s["block_size"], s["gamma_scale"], s["drop_prob"], s["mask"],
                     s["seed_region"], s["scale"], s["noise"])
        elif isinstance(m, DropBlockNd):
            entry = ("dropblock", name, m.block_size, m.gamma_scale, m.drop_prob, m.mask, m.seed_region,
                     m.scale, m.noise)
        elif not list(m.children()) and not isinstance(m, nn.Identity):
            entry = (type(m).__name__, name)
        else:
            continue
        handles.append(m.register_forward_hook(lambda mod, i, o, e=entry: seq.append(e)))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 64, 64))
    for h in handles:
        h.remove()
    return seq


@pytest.mark.parametrize("arch", ["resnet18", "resnet26"])  # BasicBlock and Bottleneck
def test_timm_resnet_recipe_reproduces_drop_block_rate(arch):
    timm_model = timm.create_model(arch, drop_block_rate=0.1)
    ours = apply_dropblock(timm.create_model(arch), "timm-resnet", input_size=[3, 64, 64])
    expected = _call_sequence(timm_model)
    got = _call_sequence(ours)
    assert [e for e in expected if e[0] == "dropblock"] == [e for e in got if e[0] == "dropblock"]
    assert expected == got  # same positions in the forward: bn -> drop_block -> act
    assert len([e for e in got if e[0] == "dropblock"]) == len(dbt.find_timm_dropblocks(timm_model))


def test_drop_block_rate_is_recognised_and_converted():
    timm_model = timm.create_model("resnet18", drop_block_rate=0.2)
    recipe = dbt.timm_dropblock_recipe(timm_model)
    assert recipe is not None and recipe.name == "timm-resnet" and recipe.rate == 0.2
    m = dbt.create_model("resnet18", drop_block_rate=0.2)
    assert not dbt.find_timm_dropblocks(m)
    assert describe(m).recipe.name == "timm-resnet"
    assert _call_sequence(m) == _call_sequence(timm_model)
    remove_dropblock(m)
    assert not _ours(m) and isinstance(m.layer3[0].drop_block, nn.Identity)
    with pytest.raises(ValueError, match="drop_block_rate"):
        dbt.create_model("resnet18", "paper-resnet50", drop_block_rate=0.1)
    with pytest.raises(SurgeryError, match="another library"):
        apply_dropblock(timm.create_model("resnet18", drop_block_rate=0.1), "paper-resnet50")


def test_convert_falls_back_to_one_for_one_swap():
    m = timm.create_model("resnet18", drop_block_rate=0.1)
    m.layer3[0].drop_block.block_size = 4  # no longer timm's placement: no recipe reproduces it
    assert dbt.timm_dropblock_recipe(m) is None
    before = _call_sequence(m)
    dbt.convert_timm_dropblock(m)
    assert not dbt.find_timm_dropblocks(m) and _call_sequence(m) == before
    assert dbt.convert_timm_dropblock(timm.create_model("resnet10t")) is not None  # nothing to do


@pytest.mark.parametrize("size,block,gamma_scale", [(14, 5, 0.25), (7, 3, 1.0)])
def test_converted_modules_drop_what_timm_drops(size, block, gamma_scale):
    torch.manual_seed(0)
    timm_mod = TimmDropBlock2d(0.1, block, gamma_scale).train()
    ours = DropBlock2d(**timm_integration._settings(timm_mod)).train()
    x = torch.ones(2048, 1, size, size)
    exp = expected_drop_rate(paper_gamma(0.1, (size, size), (block, block), gamma_scale),
                             (size, size), (block, block), "full")
    for mod in (timm_mod, ours):
        dropped = sum(float((mod(x) == 0).float().mean()) for _ in range(3)) / 3
        assert abs(dropped - exp) < 0.1 * exp + 0.002, (type(mod).__module__, dropped, exp)
