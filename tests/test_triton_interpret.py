"""The Triton kernels, run by Triton's interpreter on CPU tensors (no GPU needed).

``TRITON_INTERPRET=1`` must be set before the kernels are decorated, i.e. before
``dropblock_fx.op.triton_kernels`` is first imported anywhere in the process, so the checks
(``tests/_triton_interpret_checks.py``) run once in a subprocess and each is reported here as
its own test.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CHECKS_FILE = HERE / "_triton_interpret_checks.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _check_names() -> list[str]:
    tree = ast.parse(CHECKS_FILE.read_text())
    return sorted(n.name[len("check_"):] for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("check_"))


def _run(code_or_file: list[str], env_extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, *code_or_file], env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent
    )


@pytest.fixture(scope="session")
def interpreter_results() -> dict[str, dict]:
    """The one subprocess run (session-scoped: a module fixture is set up again whenever a
    worker of pytest-xdist runs another file's test between two of these)."""
    proc = _run([str(CHECKS_FILE)], {"TRITON_INTERPRET": "1", "DROPBLOCK_FX_BACKEND": "auto"}, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS "):])
    pytest.fail(f"interpreter checks crashed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("name", _check_names())
def test_kernels_under_interpreter(name: str, interpreter_results: dict[str, dict]) -> None:
    result = interpreter_results.get(name)
    assert result is not None, f"check {name} did not run"
    assert result["ok"], result["error"]


@pytest.fixture(scope="module")
def plain_process() -> list[str]:
    """One process without the interpreter and with ``DROPBLOCK_FX_BACKEND=reference``: the
    backend it picked, and whether the kernels refuse CPU tensors there."""
    code = (
        "import torch\n"
        "import dropblock_fx.op.masks as masks\n"
        "print('backend', masks._backend)\n"
        "from dropblock_fx.op import triton_kernels as tk\n"
        "try:\n"
        "    tk.seed_uniforms(torch.tensor([1]), (4,))\n"
        "except RuntimeError as e:\n"
        "    print('refused', 'TRITON_INTERPRET' in str(e))\n"
    )
    proc = _run(["-c", code], {"DROPBLOCK_FX_BACKEND": "reference", "TRITON_INTERPRET": "0"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_backend_option_and_env_var(plain_process) -> None:
    from dropblock_fx.op import functional as fn

    assert "triton" in fn.BACKENDS
    assert "backend reference" in plain_process


def test_kernels_refuse_cpu_tensors_without_interpreter(plain_process) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this process runs the interpreter")
    assert plain_process[-1] == "refused True", plain_process
