"""The README is a front door and docs/ its rooms: each stays true to the code it describes.

The README's file tree against the package is ``test_imports.py``'s; here: the README's length, the strategy and
failure-model lists it documents against the registries, and every link and every section a page or the code
names (``docs/clock.md, 'Time inside one iteration'``) against the files and headings there are."""

from __future__ import annotations

import re
from pathlib import Path

from checkfree.failure_models import failure_models
from checkfree.recovery import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def config_group(group: str) -> set[str]:
    """The options the README's config-group table lists for ``group`` (its second column, names in backticks)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] == f"`{group}`":
            return set(re.findall(r"`([a-z0-9_]+)`", cells[1]))
    raise AssertionError(f"the README's config table has no row for {group}")


def headings(page: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")}


def test_the_readme_is_a_front_door_of_at_most_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_the_documented_strategies_and_failure_models_are_the_registries():
    assert config_group("strategy") == set(STRATEGIES) == {p.stem for p in (ROOT / "conf/strategy").glob("*.yaml")}
    assert config_group("failure") == set(failure_models()) == {p.stem for p in (ROOT / "conf/failure").glob("*.yaml")}


def test_every_relative_link_of_the_pages_reaches_a_file():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_every_section_named_in_the_code_and_the_pages_exists():
    """``docs/<page>.md, 'Heading'`` (or ``[page.md](page.md), "Heading"``) names a heading of that page: a
    section renamed or moved without its references fails here."""
    pattern = re.compile(r"(\w+)\.md\)?, ['\"]([^'\"]+)['\"]")
    sources = [*PAGES, *ROOT.glob("checkfree/**/*.py"), *ROOT.glob("experiments/*.py"), *ROOT.glob("tests/*.py"),
               *ROOT.glob("conf/**/*.yaml")]
    missing, seen = [], 0
    for source in sources:
        if source.name == Path(__file__).name:
            continue  # this docstring's example
        for page, heading in pattern.findall(source.read_text()):
            target = ROOT / ("README.md" if page == "README" else f"docs/{page}.md")
            if not target.exists():
                continue  # another file's name (a paper's, a dataset's), not one of our pages
            seen += 1
            if not any(h == heading or h.startswith(heading) for h in headings(target)):
                missing.append(f"{source.relative_to(ROOT)}: {page}.md, {heading!r}")
    assert seen > 10  # the pattern still finds the references there are
    assert missing == []


def test_the_results_index_names_every_experiment_with_a_report():
    index = (ROOT / "results" / "README.md").read_text()
    reported = sorted(d.name for d in (ROOT / "results").iterdir() if d.is_dir() and any(d.glob("*.md")))
    assert len(reported) >= 10
    assert [d for d in reported if f"| `{d}/` |" not in index] == []
