"""The plan is what runs: every row is a DropBlock module that is called in a training forward,
on a feature map of its stage (the input's batch, a stage map's size, on the main path), at
the planned size and, for blocks traced for their planned call, at other sizes too.

One small model per construct that broke this (each reproduces a third-party CNN), then the
real models where they are cheap."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import dropblock_fx as dbx
from constructs import (Backbone, CheckpointNet, GainUNet, IteratingUNet, PatchUnfoldBlock, PooledGateBlock,
                        RelPosAttention, SharedModuleNet, SizeBranchBlock, TFPadBlock, WindowBlock)
from dropblock_fx.testing import check_surgery

SIZE = (3, 128, 128)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:dropblock_fx. this model's recipe has a schedule")]


def _x(size: tuple[int, ...] = SIZE, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


def _runs(model: nn.Module, x: torch.Tensor) -> dict[str, list[tuple[int, ...]]]:
    """Input shapes of every DropBlock module of ``model`` in one training forward (on a copy:
    batch norm statistics move)."""
    model = copy.deepcopy(model).train()
    seen: dict[str, list[tuple[int, ...]]] = {}
    for name, m in model.named_modules():
        if isinstance(m, dbx.DropBlockNd):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(
                tuple(args[0].shape)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(no schedule|feature maps differ)")
        model(x)
    return seen


def _assert_rows_run_on_their_maps(model: nn.Module, p: dbx.Plan) -> None:
    model = dbx.apply_dropblock(copy.deepcopy(model), input_size=SIZE)
    seen = _runs(model, _x())
    assert sorted(seen) == sorted(r.path for r in p.rows)
    for r in p.rows:
        assert {s[0] for s in seen[r.path]} == {2}, r.path  # the input's batch
        assert {s[2:] for s in seen[r.path]} == {r.resolution}, r.path


# ---------------------------------------------------------------- tensors that are not feature maps


@pytest.mark.parametrize("deep, why", [
    (PatchUnfoldBlock, "no stage map"),  # (B, C, patch_area, n_patches): 4x16, 4x4
    (RelPosAttention, "side branch"),  # the logits + position term feed only a softmax
    (WindowBlock, "batch dim is 4, not the batch of 1"),  # (B * 4 windows, C, h/2, w/2)
], ids=["patch-unfold", "rel-pos-logits", "windows"])
def test_tensors_that_are_not_feature_maps_get_no_site_and_explain_why(deep, why):
    model = Backbone(deep).eval()
    p = dbx.plan(model, input_size=SIZE)
    assert {r.stage for r in p.rows} == {3, 4}
    maps = {3: (8, 8), 4: (4, 4)}
    assert all(r.resolution == maps[r.stage] for r in p.rows), [(r.path, r.resolution) for r in p.rows]
    assert any(why in line for line in p.explain().splitlines()), p.explain()
    check_surgery(model, _x())  # every row runs, on its map, eval bit-identical, ...
    _assert_rows_run_on_their_maps(model, p)


def test_the_attention_logits_position_term_is_no_shortcut():
    """HaloNet's conv-free position branch made ``logits + pos`` a residual add: a
    ``shortcut`` site on the attention logits, right before the softmax."""
    p = dbx.plan(Backbone(RelPosAttention), input_size=SIZE, sites=["shortcut"])
    assert [r.path for r in p.rows] == ["blocks.2.dropblock_shortcut", "blocks.3.dropblock_shortcut"]
    assert all(r.anchor == "shortcut into add_1" for r in p.rows), [r.anchor for r in p.rows]


def test_a_pooled_gate_makes_no_stage_and_holds_no_site():
    """GhostNetV2's DFC gate runs at half the last stage's size: it made a stage 5 (stride 64),
    so the last two stages were 4 and 5 and the gate's convs got sites."""
    model = Backbone(PooledGateBlock).eval()
    p = dbx.plan(model, input_size=SIZE)
    assert [(s.index, s.stride) for s in p.stages] == [(0, 2), (1, 4), (2, 8), (3, 16), (4, 32)]
    assert {r.stage for r in p.rows} == {3, 4}
    assert not [r.path for r in p.rows if ".gate" in r.path]
    assert any(r.path.startswith("blocks.2.") for r in p.rows) and any(r.path.startswith("blocks.3.") for r in p.rows)
    check_surgery(model, _x())


# ---------------------------------------------------------------- rows whose module never ran


def test_a_shared_module_inlined_by_the_blocks_that_call_it_has_no_row_of_its_own():
    """CoaT: ``cpe3`` is registered on the model and called only inside the serial blocks,
    whose rewritten graphs inline it; a row of its own would never run. The blocks' graphs
    hold its residual add instead."""
    model = SharedModuleNet().eval()
    p = dbx.plan(model, input_size=SIZE)
    assert not [r.path for r in p.rows if r.path.startswith("cpe")]
    assert any("cpe3.dropblock_shortcut: left out, it is never called" in n for n in p.notes), p.notes
    assert any(r.path.startswith("serial3.0.") for r in p.rows)
    check_surgery(model, _x())
    _assert_rows_run_on_their_maps(model, p)


def test_blocks_a_decoder_calls_out_of_a_module_list_with_extra_arguments_run():
    """smp's UnetDecoder iterates its ModuleList of blocks, passing the target size: its own
    trace inlined the blocks, so the blocks' rewritten forwards never ran."""
    model = IteratingUNet().eval()
    p = dbx.plan(model, input_size=SIZE)
    assert any(r.path.startswith("decoder.blocks.0.") for r in p.rows), [r.path for r in p.rows]
    check_surgery(model, _x())
    _assert_rows_run_on_their_maps(model, p)


def test_the_plan_check_runs_the_model_in_train_mode():
    """A block that only runs in training (an auxiliary branch) still has its rows; a block
    that never runs has none."""

    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Backbone(lambda c: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)))

        def forward(self, x):
            return self.net(x)

    p = dbx.plan(Aux(), input_size=SIZE)
    assert {r.stage for r in p.rows} == {3, 4} and not [n for n in p.notes if "left out" in n]


# ---------------------------------------------------------------- other input sizes


def test_a_block_that_reads_its_size_runs_dropblock_at_every_size():
    """TF "SAME" padding computed from ``int(x.shape[-1])``: the block is traced for its
    planned call, and again for each new size (the same path, other constants)."""
    model = Backbone(TFPadBlock).eval()
    p = dbx.plan(model, input_size=SIZE)
    assert any("traced for calls like the planned one (x=Nx16x8x8 tensor)" in n for n in p.notes), p.notes
    dbx.apply_dropblock(model, input_size=SIZE)
    for size in (64, 96, 160):
        x = _x((3, size, size))
        seen = _runs(model, x)
        assert sorted(seen) == sorted(r.path for r in p.rows), size
        with torch.no_grad():  # eval: exactly the original forward's outputs at that size too
            assert torch.equal(model(x), dbx.remove_dropblock(copy.deepcopy(model))(x))


def test_a_block_whose_path_depends_on_its_size_is_reported_where_it_does_not_run():
    model = Backbone(SizeBranchBlock).eval()
    dbx.apply_dropblock(model, input_size=SIZE)
    rows = {r.path: r for r in dbx.describe(model).rows}
    model.train()
    with pytest.warns(UserWarning, match=r"2 DropBlock module\(s\) did not run .*blocks\.2\.dropblock"):
        model(_x((3, 48, 48)))  # blocks.2 and .3 see 3x3 and 2x2 maps: another path
    d = dbx.describe(model)
    missed = {r.path: r.skipped_at for r in d.rows if r.skipped_at}
    assert missed == {path: ((3, 3),) if path.startswith("blocks.2.") else ((2, 2),)
                      for path in rows if path.startswith(("blocks.2.", "blocks.3."))}
    assert any(f"{len(missed)} of {len(rows)} DropBlock modules did not run" in n for n in d.notes), d.notes


# ---------------------------------------------------------------- gradient checkpointing


def _checkpoint_calls(model: nn.Module, x: torch.Tensor) -> int:
    """How many ``torch.utils.checkpoint.checkpoint`` calls one training step makes (timm's
    ``checkpoint_seq`` calls it too)."""
    import torch.utils.checkpoint as cp

    n = [0]
    real = cp.checkpoint

    def counted(*args, **kwargs):
        n[0] += 1
        return real(*args, **kwargs)

    cp.checkpoint = counted
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(no schedule|feature maps differ|too small)")
            model(x).sum().backward()
    finally:
        cp.checkpoint = real
    return n[0]


def test_rewritten_stages_keep_gradient_checkpointing():
    model = CheckpointNet().eval()
    dbx.apply_dropblock(model, input_size=SIZE, schedule=None)
    assert not [n for n in dbx.describe(model).notes if "checkpoint" in n]
    x = _x()
    model.train()
    grads = {}
    for on in (False, True):
        model.set_grad_checkpointing(on)
        model.zero_grad()
        torch.manual_seed(0)  # the same masks: checkpoint replays the RNG when it recomputes
        assert _checkpoint_calls(model, x) == (2 if on else 0)
        grads[on] = [p.grad.clone() for p in model.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[False], grads[True]))
    assert len(_runs(model, x)) == len(dbx.describe(model).rows)


# ---------------------------------------------------------------- real models


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name, size, bad", [
    ("mobilevitv2_050", 256, None),
    ("efficientvit_m0", 224, None),
    ("halonet_h1", 256, "self_attn_shortcut"),
    ("ghostnetv2_100", 224, "short_conv"),
    ("coat_lite_tiny", 224, r"^cpe\d"),  # the serial blocks inline the shared cpe3 / cpe4
])
def test_timm_models_whose_plans_did_not_run(name, size, bad):
    """Planning checks every row by running it (a row that does not run is left out); the
    stages end where the model's own feature_info does (no stage from a side branch)."""
    model = timm.create_model(name, pretrained=False).eval()
    p = dbx.plan(model, input_size=(3, size, size))
    assert p.rows and {r.stage for r in p.rows} == {s.index for s in p.stages[-2:]}
    assert p.stages[-1].stride == max(f["reduction"] for f in model.feature_info), [s.stride for s in p.stages]
    if bad:
        assert not [r.path for r in p.rows if re.search(bad, r.path)]
    if size == 224:  # the costly models at 256 are covered by the coverage run's check_surgery
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        check_surgery(model, x)


@pytest.mark.parametrize("name", ["convnext_atto", "poolformer_s12"])
def test_timm_stages_keep_gradient_checkpointing(name):
    model = timm.create_model(name, pretrained=False)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    before = _checkpoint_calls(model, x)
    dbx.apply_dropblock(model, input_size=(3, 64, 64), schedule=None)
    assert _checkpoint_calls(model, x) == before > 0
    assert not [n for n in dbx.describe(model).notes if "checkpoint" in n]


def _third_party(name: str) -> nn.Module:
    if name == "hf-mobilenet_v2":
        transformers = pytest.importorskip("transformers")
        return transformers.MobileNetV2Model(transformers.MobileNetV2Config())
    if name == "efficientnet_pytorch-b0":
        return pytest.importorskip("efficientnet_pytorch").EfficientNet.from_name("efficientnet-b0")
    if name == "monai-efficientnet_bn":
        return pytest.importorskip("monai.networks.nets").EfficientNetBN("efficientnet-b0", pretrained=False,
                                                                          spatial_dims=2)
    if name == "smp-unet":
        return pytest.importorskip("segmentation_models_pytorch").Unet("resnet34", encoder_weights=None)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["hf-mobilenet_v2", "efficientnet_pytorch-b0", "monai-efficientnet_bn"])
def test_third_party_blocks_run_dropblock_at_every_size_after_one_plan(name):
    """Planned at 224, trained at 64, 160, 224 and 320 px: every DropBlock runs."""
    model = _third_party(name).eval()
    dbx.apply_dropblock(model, input_size=(3, 224, 224), schedule=None)
    rows = {r.path for r in dbx.describe(model).rows}
    for size in (64, 160, 320):
        assert set(_runs(model, torch.randn(2, 3, size, size))) == rows, size


def test_smp_unet_decoder_blocks_run():
    model = _third_party("smp-unet").eval()
    p = check_surgery(model, torch.randn(2, 3, 128, 128))
    assert any(r.path.startswith("decoder.blocks.0.") for r in p.rows)


def test_decoder_blocks_that_read_their_own_gain_are_traced_for_any_map_size():
    """Decoder blocks traced for their recorded call that scale by their own parameter: the
    parameter's read recorded junk nodes, and the deepest block's trace fell back to its
    planned map size (its guard said ``x=Nx64x8x8``), so a call at another size was traced
    again. Every block is now traced once for any map size, and its rows run at both sizes."""
    model = GainUNet().eval()
    stages = [0, 1, 2, 3]
    p = dbx.plan(model, input_size=SIZE, stages=stages)
    guards = [n for n in p.notes if n.startswith("dec.") and "traced for calls like the planned one" in n]
    assert len(guards) == 3 and all("x*x*" in n for n in guards), guards
    assert {r.path.split(".")[1] for r in p.rows if r.path.startswith("dec.")} == {"0", "1", "2"}
    check_surgery(model, _x(), stages=stages)
    applied = dbx.apply_dropblock(copy.deepcopy(model), input_size=SIZE, stages=stages)
    seen = _runs(applied, _x())
    assert sorted(seen) == sorted(r.path for r in p.rows)
    assert all({s[2:] for s in seen[r.path]} == {r.resolution} for r in p.rows)
    seen = _runs(applied, _x((3, 96, 96)))
    assert sorted(seen) == sorted(r.path for r in p.rows)
