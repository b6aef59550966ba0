"""The README and docs/*.md name only things that exist: every relative link (and its #anchor, when it
points into a markdown file) and every repository path written in backticks (`tvmzoo/run/serve/`,
`benchmarks/results/vs_peers.md`, ...). Paths with placeholders (`<name>`, `*`, `…`) are not checked."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Backticked paths are checked when they start with one of the repository's own top-level folders.
TOP = ("tvmzoo/", "benchmarks/", "tests/", "docs/", "build_in/", "common/", "source_code/", "deploy/",
       "scripts/", ".ci/")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
PLACEHOLDER = re.compile(r"[<>*…{}$ ]|\.\.\.")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (commands there name files the reader makes)."""
    return "\n".join(re.split(r"^```.*$", text, flags=re.M)[0::2])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", _prose(path.read_text()), flags=re.M)}


def links(doc: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(doc.read_text())) if not re.match(r"[a-z]+:", t)]


def repo_paths(doc: Path) -> list[str]:
    found = []
    for span in CODE.findall(_prose(doc.read_text())):
        path = span.split(":")[0].rstrip(".,;")
        if path.startswith(TOP) and not PLACEHOLDER.search(path):
            found.append(path)
    return found


def test_slug_matches_github():
    assert slug("Serving: KServe v2 / Triton protocol (`tvmzoo serve`)") == "serving-kserve-v2--triton-protocol-tvmzoo-serve"
    assert slug("Deployment without Python: the C++ runner (`deploy/cpp`)") == "deployment-without-python-the-c-runner-deploycpp"


def test_the_checks_see_something():
    """A parser that found nothing would pass every file: the README has links and paths."""
    readme = ROOT / "README.md"
    assert len(links(readme)) >= 5 and len(repo_paths(readme)) >= 10


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_exist(doc: Path):
    missing = sorted({p for p in repo_paths(doc) if not (ROOT / p).exists()})
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"
