"""The docs site builds (``mkdocs build --strict``), opens from disk, and its API reference reads
as a user needs it: examples are code blocks, cross-references are links, one entry per public
name, nothing internal. Skipped only where mkdocs is not installed (the dev extra installs it)."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

import dropblock_fx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|py:\w+):(?=`|\w)")  # tags stripped
INTERNAL = ["Prepared", "prepare(", "resolve_recipe", "internal: holds live modules", "target.py",
            "candidates.py", "select.py", "actions.py", "dropblock_fx.surgery.plan"]


class _Text(HTMLParser):
    """The page's text, split into what is inside ``<pre>`` (code blocks) and what is not."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = {"pre": 0, "blockquote": 0}
        self.code: list[str] = []
        self.prose: list[str] = []
        self.quoted: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.depth:
            self.depth[tag] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.depth:
            self.depth[tag] -= 1

    def handle_data(self, data: str) -> None:
        (self.code if self.depth["pre"] else self.prose).append(data)
        if self.depth["blockquote"]:
            self.quoted.append(data)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def api(site) -> tuple[str, _Text]:
    html = (site / "api.html").read_text(encoding="utf-8")
    text = _Text()
    text.feed(html)
    return html, text


def test_site_opens_from_disk(site):
    """Pages are files (``api.html``), and links between pages point at files, not folders."""
    index = (site / "index.html").read_text(encoding="utf-8")
    assert (site / "api.html").is_file() and (site / "demo.html").is_file()
    assert 'href="api.html' in index or 'href="./api.html' in index
    assert not re.search(r'href="(?:\./)?api/"', index)


def test_api_examples_are_code_blocks(api):
    html, text = api
    code = "".join(text.code)
    assert code.count(">>> ") >= 30  # every public function's example
    assert ">>>" not in "".join(text.prose)  # none left as a paragraph
    assert not text.quoted  # nor inside blockquotes
    assert "apply_dropblock(" in code and "drop_block(" in code


def test_api_has_no_sphinx_roles_and_links_its_cross_references(api):
    html, text = api
    prose = "".join(text.prose)
    assert not SPHINX_ROLE.search(prose), SPHINX_ROLE.search(prose)
    # a reference between entries is a link to the entry's anchor on the same page
    links = set(re.findall(r'<a class="autorefs autorefs-internal"[^\n]*?href="(#dropblock_fx\.[\w.]+)"', html))
    assert len(links) >= 10, links
    assert {"#dropblock_fx.apply_dropblock", "#dropblock_fx.DropBlockSchedule", "#dropblock_fx.drop_block"} <= links


def test_api_has_one_entry_per_public_name_and_nothing_internal(api):
    html, text = api
    headings = re.findall(r'<h[2-4] id="(dropblock_fx\.[\w.]+)" class="doc doc-heading"', html)
    for name in dropblock_fx.__all__:
        assert headings.count(f"dropblock_fx.{name}") == 1, name
    prose = "".join(text.prose)
    assert not [w for w in INTERNAL if w in prose], [w for w in INTERNAL if w in prose]


def test_no_page_shows_sphinx_roles(site):
    def text(page: Path) -> str:
        return re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8"))

    bad = [p.name for p in site.rglob("*.html") if SPHINX_ROLE.search(text(p))]
    assert not bad, bad
