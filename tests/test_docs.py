"""README.md and docs/*.md: every relative link points at a file that exists, and every #anchor at a
heading of that file, with GitHub's slugs; every page is reachable from README; every script's
docstring names its page."""
import importlib
import re

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ["moco", "simclr", "byol", "simsiam", "cmc", "insdis", "linear_eval"]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> list:
    """The lines outside fenced code blocks (``` or ~~~), where headings and links live."""
    lines, fence = [], None
    for line in text.splitlines():
        marker = re.match(r"\s*(```|~~~)", line)
        if marker and (fence is None or marker.group(1) == fence):
            fence = None if fence else marker.group(1)
        elif fence is None:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _, spaces -> -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path) -> set:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    for line in prose(path.read_text()):
        heading = re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def links(path) -> list:
    text = "\n".join(prose(path.read_text()))
    text = re.sub(r"(`+)(?!\])(.+?)\1", "", text)  # inline code is not a link (a link's text may hold code)
    return LINK.findall(text)


def test_slugs_follow_githubs_rules():
    assert slug("MoCo v1 / v2 — `moco.py`") == "moco-v1--v2--mocopy"
    assert slug("GPU path: `--amp` and `--channels-last`") == "gpu-path---amp-and---channels-last"
    assert slug("Quickstart (CPU, no data needed)") == "quickstart-cpu-no-data-needed"
    assert slug("CIFAR-size stem and the online kNN monitor") == "cifar-size-stem-and-the-online-knn-monitor"
    assert slug("snake_case stays") == "snake_case-stays"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_exists(page):
    found = links(page)
    assert found, "no links found: the parser is broken"
    broken = []
    for target in found:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... : not checked here
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_reachable_from_readme():
    pages = {target.partition("#")[0] for target in links(ROOT / "README.md")}
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in pages]
    assert not missing, missing


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_its_page_and_its_docstring_names_it(name):
    assert (ROOT / "docs" / f"{name}.md").is_file()
    assert f"docs/{name}.md" in importlib.import_module(name).__doc__


def test_readme_is_a_front_door():
    """README.md: at most 120 lines, the set-up and test command CI runs, and no commit id of this repository
    (citations of official commits live on the docs pages)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 120
    assert "python3 -m pytest -q tests" in text and "pip install -r requirements.txt" in text
    ids = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", w) and re.search(r"\d", w)]
    assert not ids, ids
    for section in ("## Set-up", "## Quickstart", "## Launching", "## Methods", "## Results"):
        assert section in text, section
