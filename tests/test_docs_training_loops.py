"""The training-loop pages exist, one per loop, and the imports they tell users to add work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGES = Path(__file__).resolve().parents[1] / "docs" / "training-loops"
LOOPS = ["plain-pytorch", "timm-train", "lightning", "hf-trainer"]


def _imports(text: str) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.startswith(("import ", "from "))]


@pytest.mark.parametrize("loop", LOOPS)
def test_page_imports_run(loop):
    text = (PAGES / f"{loop}.md").read_text()
    lines = [ln for ln in _imports(text) if "dropblock_fx" in ln]
    assert lines, f"{loop}.md shows no dropblock_fx import"
    for line in lines:
        try:
            exec(line, {})
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("dropblock_fx"):
                pytest.skip(f"{loop}.md needs {e.name}")
            raise
