"""Checks of the Triton kernels under ``TRITON_INTERPRET=1`` on CPU tensors.

Run by ``tests/test_triton_interpret.py`` in a subprocess, because the interpreter is chosen
when ``@triton.jit`` decorates a kernel: the variable must be set before
``dropblock_fx.op.triton_kernels`` is first imported, which a shared pytest process cannot
promise. Each check is a function ``check_<name>()`` that raises on failure; the script prints
one JSON line ``{name: {"ok": bool, "error": str, "seconds": float}}``.

Run it by hand::

    TRITON_INTERPRET=1 python tests/_triton_interpret_checks.py [name ...]

The same checks on a GPU (compiled kernels, CUDA tensors; ``tests/test_triton_cuda.py``)::

    python tests/_triton_interpret_checks.py --device cuda [name ...]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

DEVICE = "cuda" if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cuda" else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    raise SystemExit("set TRITON_INTERPRET=1, or pass --device cuda (see the module docstring)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dropblock_fx as dbx  # noqa: E402
from dropblock_fx.op import custom_ops as co  # noqa: E402
from dropblock_fx.op import functional as fn  # noqa: E402
from dropblock_fx.op import masks  # noqa: E402
from dropblock_fx.op import triton_kernels as tk  # noqa: E402
from dropblock_fx.op.gamma import clip_block, expected_drop_rate, paper_gamma, seed_grid  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------- helpers


def _fmt(nd: int) -> torch.memory_format:
    return torch.channels_last if nd == 2 else torch.channels_last_3d


def _dilate(seeds: torch.Tensor, spatial, block, seed_region) -> torch.Tensor:
    """Drop mask of a seed grid by max-pooling: independent of the library's expansions."""
    s = seeds.float()
    pad: list[int] = []
    for k in reversed(block):
        pad += [k - 1, k - 1] if seed_region == "valid" else [(k - 1) // 2, k // 2]
    s = F.pad(s, pad)
    pool = F.max_pool2d if len(spatial) == 2 else F.max_pool3d
    d = pool(s, kernel_size=tuple(block), stride=1)
    assert tuple(d.shape[2:]) == tuple(spatial)
    return d > 0


def _fused(x, gamma, block, mask="channel", region="valid", scale="count", noise=False, seed=1234):
    """Run the op directly; returns out, keep (bool, mask planes), scale, and the seed tensor."""
    spatial = tuple(x.shape[2:])
    block = clip_block(spatial, tuple(block))
    seed_t = torch.tensor([seed], dtype=torch.int64)
    out, bits, s = co.drop_block_fused(
        x, torch.tensor([gamma]), seed_t, torch.tensor([1.0]), list(block), mask, region, scale, noise
    )
    return out, tk.unpack_keep(bits, tuple(x.shape)), s, bits, seed_t, block


def _ref_keep(x, gamma, block, mask, region, seed_t):
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    mnc = {"channel": (n, c), "shared": (n, 1), "batch": (1, 1)}[mask]
    u = tk.seed_uniforms(seed_t, mnc + seed_grid(spatial, block, region))
    return ~_dilate(u < gamma, spatial, block, region)


def _count_scale(keep: torch.Tensor) -> torch.Tensor:
    kept = keep.sum().clamp(min=1).to(torch.float32)
    return torch.div(float(keep.numel()), kept)


CASES = [  # shape, block, mask, region, channels_last
    ((2, 3, 9, 11), 3, "channel", "valid", False),
    ((2, 3, 9, 11), 4, "channel", "full", True),
    ((2, 3, 9, 11), 3, "shared", "valid", True),
    ((2, 3, 9, 11), 2, "shared", "full", False),
    ((2, 3, 9, 11), 5, "batch", "valid", False),
    ((2, 3, 9, 11), 3, "batch", "full", True),
    ((1, 2, 5, 70), 35, "channel", "valid", True),  # 3 words per row, block spans words
    ((1, 2, 6, 40), 7, "channel", "full", False),
    ((2, 3, 5, 6, 7), 3, "channel", "valid", True),
    ((2, 2, 4, 5, 6), 2, "shared", "full", False),
    ((1, 2, 4, 5, 6), (2, 3, 4), "channel", "full", True),
    ((2, 3, 9, 11), 11, "channel", "valid", False),  # clipped to the map: one seed position
    ((2, 3, 9, 11), 1, "channel", "full", False),  # dropout
]


# ---------------------------------------------------------------------------- checks


def check_masks_bit_exact_vs_reference_expansion():
    """Same seeds (the kernel's Philox draws) -> the same mask as a max-pool expansion."""
    torch.manual_seed(0)
    for shape, k, mask, region, cl in CASES:
        nd = len(shape) - 2
        x = torch.randn(shape)
        if cl:
            x = x.to(memory_format=_fmt(nd))
        block = k if isinstance(k, tuple) else (k,) * nd
        out, keep, s, _, seed_t, block = _fused(x, 0.15, block, mask, region)
        ref = _ref_keep(x, 0.15, block, mask, region, seed_t)
        assert torch.equal(keep, ref), f"{shape} k={k} {mask} {region}: {int((keep != ref).sum())} units differ"
        assert torch.equal(out, x * keep * _count_scale(keep)), f"{shape} k={k} {mask} {region}: output"


def check_random_configs_bit_exact():
    """A seeded sweep of odd shapes (sizes 1, one and two words per row, blocks larger than
    the map, even blocks, 3-D), every mode and layout: mask and output exact."""
    rng = __import__("random").Random(1234)
    for i in range(40):
        nd = rng.choice((2, 2, 3))
        spatial = [rng.choice((1, 2, 3, 5, 8, 13, 33)) for _ in range(nd)]
        if nd == 3:
            spatial = [min(s, 6) for s in spatial[:2]] + [spatial[2]]
        shape = (rng.choice((1, 2)), rng.choice((1, 2, 3))) + tuple(spatial)
        block = tuple(rng.choice((1, 2, 3, 4, 7, 40)) for _ in range(nd))
        mask, region = rng.choice(("channel", "shared", "batch")), rng.choice(("valid", "full"))
        dtype = rng.choice(DTYPES)
        gamma = rng.choice((0.02, 0.1, 0.3))
        x = torch.randn(shape).to(dtype)
        if rng.random() < 0.5:
            x = x.to(memory_format=_fmt(nd))
        out, keep, s, _, seed_t, clipped = _fused(x, gamma, block, mask, region, seed=i)
        ref = _ref_keep(x, gamma, clipped, mask, region, seed_t)
        what = f"case {i}: {shape} block {block} {mask} {region} {dtype}"
        assert torch.equal(keep, ref), what + ": mask"
        assert torch.equal(out, torch.mul(x, keep).mul_(_count_scale(keep).to(dtype))), what + ": output"
        assert out.stride() == x.stride() or not (x.is_contiguous() or tk.is_channels_last(x)), what + ": layout"


def check_valid_mask_is_union_of_whole_blocks():
    torch.manual_seed(1)
    for shape, k in (((2, 3, 9, 11), 3), ((2, 3, 12, 10), 4), ((1, 2, 6, 7, 8), 3)):
        nd = len(shape) - 2
        x = torch.ones(shape)
        out, keep, *_ = _fused(x, 0.1, (k,) * nd, "channel", "valid")
        dropped = ~keep
        assert dropped.any() and keep.any()
        # Seed positions whose whole block is dropped; their union must be the drop mask.
        pool = F.max_pool2d if nd == 2 else F.max_pool3d
        inside = -pool(-dropped.float(), kernel_size=k, stride=1) > 0
        rebuilt = _dilate(inside, tuple(shape[2:]), (k,) * nd, "valid")
        assert torch.equal(rebuilt, dropped), "the drop mask is not a union of whole blocks inside the map"


def check_shared_and_batch_masks_identical_across_channels():
    x = torch.ones(3, 5, 10, 12)
    out, keep, *_ = _fused(x, 0.1, (3, 3), "shared", "valid")
    z = out == 0
    assert keep.shape == (3, 1, 10, 12)
    assert torch.equal(z, z[:, :1].expand_as(z)), "shared mask differs across channels"
    assert not torch.equal(z[0], z[1]), "shared mask should differ across samples"
    out, keep, *_ = _fused(x, 0.1, (3, 3), "batch", "full")
    z = out == 0
    assert torch.equal(z, z[:1, :1].expand_as(z)), "batch mask differs across samples or channels"


def check_channel_masks_differ_across_channels():
    out, keep, *_ = _fused(torch.ones(2, 8, 10, 10), 0.1, (3, 3))
    planes = keep.reshape(16, -1)
    assert len({tuple(p.tolist()) for p in planes}) > 8


def check_drop_rate_matches_expected():
    """Mean dropped fraction over iid mask planes within 5 standard errors of the exact rate."""
    for mask, region, calibrate in (("channel", "valid", False), ("channel", "full", False), ("shared", "valid", True)):
        n, c, h, w, k, p = (32, 16, 12, 12, 3, 0.2) if mask == "channel" else (256, 1, 12, 12, 3, 0.2)
        x = torch.ones(n, c, h, w)
        torch.manual_seed(3)
        out = dbx.drop_block(x, p, k, mask=mask, seed_region=region, calibrate=calibrate, scale="none")
        planes = (out == 0).float()[:, :1 if mask == "shared" else c].reshape(-1, h * w).mean(1)
        if calibrate:
            expected = p
        else:
            expected = expected_drop_rate(paper_gamma(p, (h, w), (k, k)), (h, w), (k, k), region)
        se = planes.std().item() / math.sqrt(planes.numel())
        got = planes.mean().item()
        assert abs(got - expected) < 5 * se + 1e-6, f"{mask}/{region}: dropped {got:.4f}, expected {expected:.4f} (se {se:.4f})"


def check_count_normaliser_exact_all_dtypes():
    for dtype in DTYPES:
        for cl in (False, True):
            x = torch.randn(2, 3, 9, 11).to(dtype)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            out, keep, s, *_ = _fused(x, 0.1, (3, 3))
            sc = _count_scale(keep)
            assert float(s) == float(sc), (dtype, float(s), float(sc))
            ref = torch.mul(x, keep).mul_(sc.to(dtype))
            assert out.dtype == dtype and torch.equal(out, ref), f"{dtype} cl={cl}: output != x * keep * numel/kept"


def check_backward_exact_all_dtypes():
    dbx.set_backend("triton")
    for dtype in DTYPES:
        x = torch.randn(2, 3, 9, 11, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
        torch.manual_seed(5)
        y = dbx.drop_block(x, 0.2, 3)
        g = torch.randn_like(y)
        y.backward(g)
        keep = y != 0  # randn inputs are never 0
        sc = _count_scale(keep).to(dtype)
        assert torch.equal(y, torch.mul(x.detach(), keep).mul_(sc)), f"{dtype}: forward"
        assert torch.equal(x.grad, torch.mul(g, keep).mul_(sc)), f"{dtype}: grad != grad * keep * scale"
        # Second order: the backward is linear in grad, with the same mask.
        xx = torch.randn(2, 3, 9, 11, dtype=dtype, requires_grad=True)
        yy = dbx.drop_block(xx, 0.2, 3)
        (gx,) = torch.autograd.grad(yy, xx, torch.ones_like(yy), create_graph=True)
        (ggx,) = torch.autograd.grad(gx.sum(), xx, allow_unused=True) if gx.requires_grad else (None,)
        assert ggx is None or torch.equal(ggx, torch.zeros_like(xx))


def check_counter_is_zeroed_by_the_seed_kernel():
    """No zero-fill launch: the seed kernel zeroes the dropped-unit counter, whatever the
    allocator handed out (poisoned here)."""
    orig = tk.alloc_mask_outputs

    def poisoned(*args, **kwargs):
        bits, cnt = orig(*args, **kwargs)
        return bits, cnt.fill_(10**9)

    tk.alloc_mask_outputs = poisoned
    try:
        for cl in (False, True):
            shape = (2, 5, 13, 9)
            gamma = torch.tensor([0.05])
            bits, cnt = tk.drop_block_mask(gamma, torch.tensor([11]), shape, cl, (3, 3), "channel", "valid")
            keep = tk.unpack_keep(bits, shape)
            assert int(cnt) == int((~keep).sum()) > 0, (int(cnt), int((~keep).sum()))
    finally:
        tk.alloc_mask_outputs = orig


def check_eager_calls_skip_the_custom_op():
    """Plain eager calls run the kernels through an autograd.Function (no custom-op dispatch on
    the host); under a dispatch mode the custom op runs. Same draw, same bits, same gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    calls = []
    orig = co.drop_block_fused

    def counted(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    dbx.set_backend("triton")
    co.drop_block_fused = counted
    try:
        results = []
        x = torch.randn(2, 4, 9, 11, dtype=torch.float16, requires_grad=True)
        g = torch.randn_like(x)
        for mode in (None, Passthrough):
            torch.manual_seed(3)
            if mode is None:
                y = dbx.drop_block(x, 0.2, 3)
            else:
                with mode():
                    y = dbx.drop_block(x, 0.2, 3)
            y.backward(g)
            results.append((y.detach(), x.grad, len(calls)))
            x.grad = None
    finally:
        co.drop_block_fused = orig
    (y0, g0, n0), (y1, g1, n1) = results
    assert n0 == 0 and n1 == 1, (n0, n1)
    assert torch.equal(y0, y1) and torch.equal(g0, g1) and bool((y0 == 0).any())


def check_determinism_same_seed():
    dbx.set_backend("triton")
    x = torch.randn(2, 4, 10, 12)
    torch.manual_seed(7)
    a = dbx.drop_block(x, 0.2, 3)
    torch.manual_seed(7)
    b = dbx.drop_block(x, 0.2, 3)
    c = dbx.drop_block(x, 0.2, 3)
    assert torch.equal(a, b), "same torch seed gave different masks"
    assert not torch.equal(a, c), "consecutive calls gave the same mask"
    g1, g2 = torch.Generator(DEVICE).manual_seed(3), torch.Generator(DEVICE).manual_seed(3)
    assert torch.equal(dbx.drop_block(x, 0.2, 3, generator=g1), dbx.drop_block(x, 0.2, 3, generator=g2))


def check_channels_last_preserved():
    dbx.set_backend("triton")
    for shape in ((2, 3, 9, 11), (2, 3, 4, 5, 6)):
        x = torch.randn(shape).to(memory_format=_fmt(len(shape) - 2))
        for mask in ("channel", "shared"):
            y = dbx.drop_block(x, 0.2, 3, mask=mask)
            assert y.stride() == x.stride(), (shape, mask, y.stride(), x.stride())
    xs = torch.randn(2, 6, 9, 11)[:, ::2]  # neither layout: computed on a contiguous copy
    y = dbx.drop_block(xs, 0.2, 3)
    assert y.is_contiguous() and y.shape == xs.shape
    assert torch.equal(y != 0, (y != 0) & (xs != 0))


def check_channels_last_same_mask_as_contiguous():
    x = torch.randn(2, 5, 9, 11)
    a = _fused(x, 0.2, (3, 3))
    b = _fused(x.to(memory_format=torch.channels_last), 0.2, (3, 3))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def check_scale_expected_and_none():
    x = torch.randn(2, 3, 9, 11)
    dbx.set_backend("triton")
    torch.manual_seed(0)
    y = dbx.drop_block(x, 0.1, 3, scale="expected")
    keep = y != 0
    gamma = paper_gamma(0.1, (9, 11), (3, 3))
    sc = torch.tensor(1.0 / (1.0 - expected_drop_rate(gamma, (9, 11), (3, 3), "valid")))
    assert torch.allclose(y[keep], x[keep] * sc)
    y = dbx.drop_block(x, 0.1, 3, scale="none")
    assert torch.equal(y, x * (y != 0))


def check_noise_fill():
    x = torch.full((4, 8, 12, 12), 5.0)
    out, keep, s, *_ = _fused(x, 0.05, (3, 3), noise=True)
    kept = keep.expand_as(x)
    assert torch.equal(out[kept], (x * s)[kept])
    z = out[~kept]
    assert z.numel() > 200 and abs(z.mean().item()) < 0.3 and 0.8 < z.std().item() < 1.2


def check_inplace_and_tensor_rate():
    dbx.set_backend("triton")
    x = torch.randn(2, 3, 9, 11)
    torch.manual_seed(11)
    ref = dbx.drop_block(x, 0.2, 3)
    x2 = x.clone()
    torch.manual_seed(11)
    y = dbx.drop_block(x2, 0.2, 3, inplace=True)
    assert y is x2 and torch.equal(x2, ref)
    torch.manual_seed(11)
    yt = dbx.drop_block(x, torch.tensor(0.2), 3)
    assert yt.shape == x.shape
    y1 = dbx.drop_block(x, 1.0, 3, calibrate=True)  # calibrated gamma = 1: every seed drawn
    assert torch.equal(y1, torch.zeros_like(x)), "drop_prob=1 must drop everything (and no NaN)"


def check_inplace_writes_into_x_bit_exact():
    # In place, the kernels write into x itself: same storage, the bits and the gradient of a
    # new tensor, every layout and with noise; a non-dense x falls back to a copy.
    dbx.set_backend("triton")
    for shape, fmt, noise in (((2, 3, 9, 11), torch.contiguous_format, False),
                              ((2, 3, 9, 11), torch.channels_last, True),
                              ((2, 2, 4, 5, 6), torch.contiguous_format, False)):
        base = torch.randn(shape).contiguous(memory_format=fmt)
        g = torch.randn(shape)
        w = torch.randn(shape, requires_grad=True)
        torch.manual_seed(3)
        a = base * w
        ref = dbx.drop_block(a, 0.3, 3, noise=noise)
        (ref * g).sum().backward()
        grad_ref = w.grad.clone()
        w.grad = None
        torch.manual_seed(3)
        b = (base * w).contiguous(memory_format=fmt)
        ptr = b.data_ptr()
        out = dbx.drop_block(b, 0.3, 3, noise=noise, inplace=True)
        assert out is b and out.data_ptr() == ptr and type(out.grad_fn).__name__ == "_FusedInplaceBackward"
        assert torch.equal(out, ref), "in place must give the bits of a new tensor"
        (out * g).sum().backward()
        assert torch.equal(w.grad, grad_ref)
    x = torch.randn(2, 3, 9, 22)[..., ::2]  # not dense: a new map, copied back
    torch.manual_seed(5)
    ref = dbx.drop_block(x.clone(), 0.3, 3)
    torch.manual_seed(5)
    y = dbx.drop_block(x, 0.3, 3, inplace=True)
    assert y is x and torch.equal(y, ref)


def check_owning_sites_write_in_place_on_the_fused_path():
    # apply_dropblock's sites that alone read a norm's output write into it through the fused
    # kernels too, and the step (output, gradients, running statistics) is bit-identical.
    import copy
    import dataclasses
    import warnings

    import torchvision

    dbx.set_backend("triton")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dbx.apply_dropblock(torchvision.models.resnet18(num_classes=4), stages=[3, 4],
                                    sites=["conv", "conv_last", "shortcut"], drop_prob=0.3, block_size=3,
                                    input_size=[3, 64, 64])
    inserted = {n: m for n, m in model.named_modules() if dbx.modules.is_inserted(m)}
    owned = {r.path for r in dbx.describe(model).rows if r.owns_input}
    # after conv1's ReLU (run before it, on bn1's output), after bn2, after the projection's norm
    assert len(owned) == 10 and len(inserted) == 12, (owned, len(inserted))
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if dbx.modules.is_inserted(m):
            m.placement = dataclasses.replace(m.placement, owns_input=False)
    x = torch.randn(2, 3, 64, 64)

    def step(net):
        wrote = {}
        hooks = [m.register_forward_hook(lambda mod, a, out, n=n: wrote.__setitem__(n, out is a[0]))
                 for n, m in net.named_modules() if dbx.modules.is_inserted(m)]
        torch.manual_seed(7)
        out = net.train()(x)
        (out ** 2).sum().backward()
        for h in hooks:
            h.remove()
        return out.detach(), [q.grad.clone() for q in net.parameters()], net.state_dict(), wrote

    # cuDNN's convolution backward may add in any order on a GPU: ask for its deterministic
    # algorithms, or the two steps' weight gradients differ in the last bits whatever DropBlock does.
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        oa, ga, sa, wrote = step(model)
        ob, gb, sb, wrote_ref = step(reference)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    assert {n for n, w in wrote.items() if w} == owned and not any(wrote_ref.values())
    assert torch.equal(oa, ob), "outputs differ"
    assert all(torch.equal(u, v) for u, v in zip(ga, gb)), "gradients differ"
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "running statistics differ"


def check_module_in_eval_and_train():
    dbx.set_backend("triton")
    m = dbx.DropBlock3d(0.2, 3)
    x = torch.randn(2, 3, 5, 6, 7)
    assert m.eval()(x) is x
    y = m.train()(x)
    assert (y == 0).any() and y.shape == x.shape


def check_opcheck():
    x = torch.randn(2, 3, 9, 11)
    base = (torch.tensor([0.05]), torch.tensor([7]), torch.tensor([1.0]), [3, 3])
    for xx, mask, region, scale in (
        (x, "channel", "valid", "count"),
        (x.to(memory_format=torch.channels_last), "channel", "full", "expected"),
        (x.to(memory_format=torch.channels_last), "shared", "valid", "count"),
        (torch.randn(2, 3, 4, 5, 6).to(torch.bfloat16), "batch", "valid", "none"),
    ):
        args = (xx,) + base[:3] + ([3] * (xx.dim() - 2), mask, region, scale, False)
        torch.library.opcheck(co.drop_block_fused, args)
        bits = co.drop_block_fused(*args)[1]
        torch.library.opcheck(co.drop_block_fused_backward, (torch.randn_like(xx), bits, torch.tensor(1.5)))
        cl = not xx.is_contiguous()
        torch.library.opcheck(co.drop_block_mask, base[:2] + (list(xx.shape), cl, [3] * (xx.dim() - 2), mask, region))


def check_fx_sees_one_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    dbx.set_backend("triton")
    gm = make_fx(lambda t: dbx.drop_block(t, 0.1, 3))(torch.randn(2, 3, 9, 11))
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    fused = [t for t in targets if "drop_block_fused" in t]
    assert len(fused) == 1, targets


def check_compile_fullgraph_no_recompile():
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    dbx.set_backend("triton")
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    counter = CompileCounter()  # counts graphs (recompiles), runs them as traced
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), dbx.DropBlock2d(0.1, 3), torch.nn.ReLU())
    cm = torch.compile(m, fullgraph=True, backend=counter)
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    y1 = cm(x)
    y1.sum().backward()
    m[1].drop_prob = 0.3
    y2 = cm(x)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    z1 = (y1 == 0).float().mean().item()
    z2 = (y2 == 0).float().mean().item()
    assert z2 > z1, (z1, z2)
    torch._dynamo.reset()
    torch.compile(m, fullgraph=True, backend=backend)(x)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes]
    # Compiled graphs use the mask op and leave the multiply to inductor (fusion).
    assert any("drop_block_mask" in t for t in targets), targets
    assert not any("drop_block_fused" in t for t in targets), targets


def check_compile_dynamic_batch_one_graph():
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    dbx.set_backend("triton")
    torch._dynamo.reset()
    counter = CompileCounter()
    cm = torch.compile(dbx.DropBlock2d(0.1, 3), backend=counter, fullgraph=True, dynamic=True)
    for n in (2, 3, 5):
        x = torch.randn(n, 4, 9, 11, requires_grad=True)
        y = cm(x)
        y.sum().backward()
        assert y.shape == x.shape and (y == 0).any()
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for 3 batch sizes"


def check_compiled_form_matches_fused_op():
    """The traced form (mask op + torch multiply) gives the fused op's output and gradient."""
    for dtype, cl, mask, region, scale in (
        (torch.float32, False, "channel", "valid", "count"),
        (torch.bfloat16, True, "channel", "full", "count"),
        (torch.float16, True, "shared", "valid", "expected"),
        (torch.float32, False, "batch", "full", "none"),
    ):
        x = torch.randn(2, 3, 9, 11, dtype=dtype)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        g, seed, s_in = torch.tensor([0.1]), torch.tensor([77]), torch.tensor([1.25])
        want, bits, s = co.drop_block_fused(x, g, seed, s_in, [3, 3], mask, region, scale, False)

        def traced(t):
            return co._apply_traceable(t, g, seed, s_in, (3, 3), mask, region, scale, False, None)

        compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)
        xg = x.clone().requires_grad_()
        got = compiled(xg)
        assert torch.equal(got, want), f"{dtype} {mask} {region} {scale}: forward differs"
        gy = torch.randn_like(got)
        got.backward(gy)
        assert torch.equal(xg.grad, co.drop_block_fused_backward(gy, bits, s)), f"{dtype} {mask}: grad differs"


def check_dispatch_rules():
    import types

    fn.set_backend("auto")
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert masks.pick_backend(cuda_like) == ("triton" if masks._HAS_TRITON else "reference")
    assert masks.pick_backend(types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64)) != "triton"
    assert masks.pick_backend(torch.ones(1, 1, 2, 2, device="cpu")) != "triton"
    fn.set_backend("reference")
    assert masks.pick_backend(cuda_like) == "reference"
    fn.set_backend("triton")


CHECKS = {name[len("check_"):]: f for name, f in sorted(globals().items()) if name.startswith("check_")}


def main(argv: list[str]) -> None:
    names = [a for i, a in enumerate(argv) if a != "--device" and (i == 0 or argv[i - 1] != "--device")]
    if DEVICE == "cuda":
        torch.set_default_device("cuda")  # every factory call in the checks makes CUDA tensors
    results = {}
    for name in names or list(CHECKS):
        fn.set_backend("triton")
        t0 = time.perf_counter()
        try:
            CHECKS[name]()
            results[name] = {"ok": True, "error": "", "seconds": time.perf_counter() - t0}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc(), "seconds": time.perf_counter() - t0}
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
