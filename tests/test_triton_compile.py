"""The Triton kernels compile for a real GPU target (sm_90, through ptxas), without a GPU.

The interpreter (``test_triton_interpret.py``) checks what the kernels compute, but it accepts
code that the compiler rejects (types, shapes, control flow). Compiling ahead of time for an
H100 catches those here, before a GPU session does.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _compiler():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("kernels are interpreted in this process")
    import triton
    from triton.runtime.jit import JITFunction

    from dropblock_fx.op import triton_kernels as tk

    if not isinstance(tk._apply_kernel, JITFunction):
        pytest.skip("kernels were decorated under the interpreter in this process")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:  # pragma: no cover - older triton
        pytest.skip("this triton has no ahead-of-time compile API")

    def compile_(fn, sig: dict[str, str], consts: dict, num_warps: int = 4) -> None:
        signature = dict(sig) | {k: "constexpr" for k in consts}
        try:
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps})
        except (FileNotFoundError, RuntimeError) as e:  # pragma: no cover - no bundled ptxas
            if isinstance(e, RuntimeError) and "Cannot find" not in str(e):
                raise
            pytest.skip(f"no CUDA toolchain for triton: {e}")

    return tk, compile_


BITS = {"b_sn": "i32", "b_sc": "i32", "b_sr": "i32", "b_sm": "i32"}


def test_seed_kernels_compile_for_sm90() -> None:
    tk, compile_ = _compiler()
    compile_(tk._seeds_kernel, {"seed_ptr": "*i64", "gamma_ptr": "*fp32", "seeds_ptr": "*u8", "cnt_ptr": "*i64", "n": "i32"},
             {"BLOCK": 256})
    for full, (w, gw, k) in ((False, (14, 8, 7)), (True, (7, 7, 7)), (False, (70, 36, 35))):
        bw, lw, nw = tk._word_geometry(w)
        compile_(
            tk._seed_rows_kernel, {"seeds_ptr": "*u8", "hd_ptr": "*i32", "n_rows": "i32"},
            dict(GW=gw, W=w, K=k, FULL=full, BR=max(1, min(64, 2048 // bw)), BW=bw, LW=lw, NW=nw, KP=64 if k > 32 else 8),
        )


def test_cover_kernel_compiles_for_sm90() -> None:
    tk, compile_ = _compiler()
    sig = {"hd_ptr": "*i32", "bits_ptr": "*i32", "cnt_ptr": "*i64", "n_rows": "i32", "CM": "i32"} | BITS
    compile_(tk._cover_rows_kernel, sig, dict(S0=14, S1=1, G0=8, G1=1, K0=7, K1=1, ND=2, FULL=False,
                                              R=14, RG=8, NW=1, BQ=512, NWP=1))
    compile_(tk._cover_rows_kernel, sig, dict(S0=6, S1=9, G0=6, G1=9, K0=3, K1=3, ND=3, FULL=True,
                                              R=54, RG=54, NW=2, BQ=256, NWP=2))


def test_apply_and_grad_kernels_compile_for_sm90() -> None:
    tk, compile_ = _compiler()
    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "bits_ptr": "*i32", "cnt_ptr": "*i64", "scale_in_ptr": "*fp32",
           "scale_out_ptr": "*fp32", "seed_ptr": "*i64", "total": "i32", "mask_numel": "i32",
           "mask_numel_f": "fp32"} | BITS
    import torch

    block, warps = tk._apply_config(torch.bfloat16)  # the launch configuration of 16-bit maps
    compile_(tk._apply_kernel, sig, dict(C=1024, W=14, R=14, LW=16, CL=True, COUNT=True, NOISE=True,
                                         FIX_BF16=False, IDX64=False, BLOCK=block), warps)
    sig = {"g_ptr": "*fp16", "gi_ptr": "*fp16", "bits_ptr": "*i32", "scale_ptr": "*fp32", "total": "i64"} | BITS
    compile_(tk._grad_kernel, sig, dict(C=64, W=7, R=7, LW=8, CL=False, FIX_BF16=False, IDX64=True, BLOCK=block),
             warps)
    block, warps = tk._apply_config(torch.float32)
    sig = {"g_ptr": "*fp32", "gi_ptr": "*fp32", "bits_ptr": "*i32", "scale_ptr": "*fp32", "total": "i32"} | BITS
    compile_(tk._grad_kernel, sig, dict(C=64, W=7, R=7, LW=8, CL=True, FIX_BF16=False, IDX64=False, BLOCK=block),
             warps)
