"""The interpreter checks again, on a GPU: compiled kernels on CUDA tensors (skipped without CUDA)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECKS_FILE = Path(__file__).resolve().parent / "_triton_interpret_checks.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _check_names() -> list[str]:
    tree = ast.parse(CHECKS_FILE.read_text())
    return sorted(n.name[len("check_"):] for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("check_"))

pytestmark = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")


@pytest.fixture(scope="module")
def cuda_results() -> dict[str, dict]:
    env = dict(os.environ, DROPBLOCK_FX_BACKEND="auto")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(CHECKS_FILE), "--device", "cuda"], env=env, capture_output=True,
                          text=True, timeout=900, cwd=Path(__file__).resolve().parent.parent)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS "):])
    pytest.fail(f"CUDA checks crashed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("name", _check_names())
def test_kernels_on_cuda(name: str, cuda_results: dict[str, dict]) -> None:
    result = cuda_results.get(name)
    assert result is not None, f"check {name} did not run"
    assert result["ok"], result["error"]
