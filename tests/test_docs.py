"""What a user reads: the README's snippet runs, and no page speaks in the project's internal voice."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
USER_FILES = sorted([REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").rglob("*.md"),
                     *(REPO / "recipes").glob("*.yaml"), *(REPO / "examples").glob("*.py")])
# Markers of notes written for the team, not for users.
INTERNAL = re.compile(r"<!-- section:|\(owner:|REFERENCE\.md|\bissue \d|\bthis session\b|the issue(?:'s)? "
                      r"|no GPU in this|the issue asked", re.IGNORECASE)


@pytest.mark.parametrize("path", USER_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_internal_voice(path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if INTERNAL.search(line)]
    assert not hits, hits


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_readme_snippet_runs():
    """The 'Add it to your model' block, on a small timm ResNet and two batches of noise."""
    import timm

    text = (REPO / "README.md").read_text()
    section = text.split("## Add it to your model")[1]
    code = section.split("```python\n")[1].split("```")[0]
    torch.manual_seed(0)
    loader = [(torch.randn(2, 3, 224, 224), torch.tensor([0, 1])) for _ in range(2)]  # the recipe's size
    env = {"model": timm.create_model("resnet18", num_classes=2), "epochs": 1, "loader": loader}
    cwd = Path.cwd()
    try:
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                exec(compile(code, "README.md", "exec"), env)  # noqa: S102 - our own README
            ckpt = torch.load(Path(tmp) / "ckpt.pt", weights_only=True)
    finally:
        os.chdir(cwd)
    assert ckpt["schedule"] and env["sched"].drop_prob > 0
    assert not [w for w in caught if "dropblock_fx" in str(w.message)], [str(w.message) for w in caught]


def test_readme_plan_output_is_what_the_command_prints(capsys):
    from dropblock_fx.cli import main

    text = (REPO / "README.md").read_text()
    shown = text.split("$ dropblock-fx plan resnet50 --recipe paper-resnet50\n")[1].split("```")[0]
    assert main(["plan", "resnet50", "--recipe", "paper-resnet50"]) == 0
    assert capsys.readouterr().out.strip() == shown.strip()


def readme_as_docs_home(text: str) -> str:
    """The README with its links made relative to docs/ (the docs site's home page)."""
    text = text.replace("The pages under [`docs/`](docs/) read well on GitHub; to build",
                        "These pages are the `docs/` folder of the repository; to build")
    text = text.replace("](docs/img/", "](img/")
    text = re.sub(r"\[docs/([^\]]+)\]", lambda m: "[" + m.group(1).replace(".md", "").rstrip("/") + "]", text)
    text = text.replace("](docs/", "](")
    return (text.replace("[LICENSE](LICENSE)", "the `LICENSE` file of the repository")
                .replace("[CHANGELOG.md](CHANGELOG.md)", "[changelog](changelog.md)"))


def test_docs_home_is_the_readme():
    """docs/index.md is the README with docs-relative links; regenerate it with
    python -c "import sys; sys.path[:0] = ['tests']; import test_docs; test_docs.write_docs_home()"
    after editing the README."""
    assert (REPO / "docs" / "index.md").read_text() == readme_as_docs_home((REPO / "README.md").read_text())


def write_docs_home() -> None:
    (REPO / "docs" / "index.md").write_text(readme_as_docs_home((REPO / "README.md").read_text()))
