"""The documentation: a README a newcomer reads in one sitting, pages under docs/ that it links,
and no link in any of them that leads nowhere."""

import re
from pathlib import Path

import pytest

from tests.support import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MAX_README_LINES = 250

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title"; the target has no spaces.
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text outside code blocks and code spans, where a link is a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return [m.group("target") for m in LINK.finditer(prose(path.read_text()))]


def code_blocks(text: str) -> str:
    return "\n".join(m.group(0) for m in FENCE.finditer(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, duplicates numbered as GitHub numbers them (-1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def local(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto:, ...


def test_slugs_are_githubs():
    assert slug("The memory model against measured peaks") == "the-memory-model-against-measured-peaks"
    assert slug("When a rank dies, hangs or runs out of memory") == (
        "when-a-rank-dies-hangs-or-runs-out-of-memory")
    assert slug("The monitor's cost") == "the-monitors-cost"
    assert slug("`telepathy plan` and metrics.jsonl") == "telepathy-plan-and-metricsjsonl"


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines < MAX_README_LINES, (
        f"README.md has {lines} lines; keep it under {MAX_README_LINES}: move the detail into a page "
        f"under docs/ and link it from the README's 'Read more'")


def test_there_are_pages():
    assert PAGES, "docs/ holds no page"


@pytest.mark.parametrize("page", [README, *PAGES], ids=rel)
def test_every_link_resolves(page):
    broken = []
    for target in links(page):
        if not local(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(ROOT.resolve()):
            broken.append(f"{target} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{target} (no file or folder {dest.relative_to(ROOT.resolve())})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {rel(dest)})")
    assert not broken, f"{rel(page)} has links that lead nowhere: " + "; ".join(broken)


def test_every_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if local(t)}
    unlinked = [rel(p) for p in PAGES if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link these pages of docs/: {unlinked}"


def test_the_readme_names_the_two_commands_and_ci_runs_one_of_them():
    code = code_blocks(README.read_text())
    for command in ("make test", "make demo"):
        assert re.search(rf"^{command}\b", code, re.M), (
            f"README.md does not name `{command}` at the start of a line in a code block")
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M), ".ci/run does not call `make test`"
