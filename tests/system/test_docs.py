"""The docs tell the truth about what exists: every relative link and every file
they cite is in the repository, and each command table lists exactly the
commands the program has (its ``--help``)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / "bench" / "README.md"])
#: a path into the repository, as the docs cite one (``tests/system/test_e2e.py::name``,
#: ``edge_agent/pipeline/intake.py``); placeholders (``<role>``, ``*``) are not
CITED = re.compile(
    r"(?<![\w/.-])((?:docs|tests|bench|edge_agent|cloud_ingest|shared|firmware_sim|devstack"
    r"|ansible|scripts|\.ci)/[\w./-]*[\w/])"
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _cited(text: str) -> set[str]:
    out = set()
    for m in CITED.finditer(text):
        path = m.group(1)
        if text[m.end() : m.end() + 1] in "<*{":
            continue  # a placeholder follows: ansible/roles/<role>/...
        out.add(path.rstrip("."))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_file_and_relative_link_exists(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    missing = sorted(p for p in _cited(text) if not (ROOT / p).exists())
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} cites what does not exist: {missing}"
    assert "design.md" not in text, "design.md is not in this repository"


def _table_commands(page: Path, program: str) -> set[str]:
    rows = re.findall(rf"^\| `{program} ([a-z-]+)", page.read_text(encoding="utf-8"), re.M)
    return set(rows)


@pytest.mark.parametrize(
    ("program", "page", "module"),
    [
        ("cloud-ingest", "docs/cloud-ingest.md", "cloud_ingest.cli"),
        ("edge-agent", "docs/edge-agent.md", "edge_agent.cli"),
    ],
)
def test_each_command_table_lists_the_programs_commands(
    program: str, page: str, module: str
) -> None:
    import importlib

    main = importlib.import_module(module).main
    assert isinstance(main, click.Group)
    assert _table_commands(ROOT / page, program) == set(main.commands), page


def _table(page: str, heading: str) -> dict[str, str]:
    """The first table under ``heading`` in docs/``page``: first column (without
    backquotes) → second."""
    text = (ROOT / "docs" / page).read_text()
    section = text[text.index(heading) :]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_the_documented_events_and_counters_are_the_registries() -> None:
    """Every name exported is documented once, and every documented name exists."""
    from cloud_ingest.ingest import events
    from edge_agent import counters

    assert _table("cloud-ingest.md", "### Events on /metrics") == dict(events.HELP)
    assert _table("edge-agent.md", "## Counters") == dict(counters.HELP)
