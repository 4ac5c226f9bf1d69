"""The packages import only downwards: a newcomer can read the cloud side from its
folder names, and the edge and the cloud share only ``shared``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: cloud_ingest's folders → the folders each may import (docs/architecture.md)
CLOUD_LAYERS: dict[str, set[str]] = {
    "config": set(),
    "sinks": {"config"},
    "lake": {"config", "sinks"},
    "ingest": {"config", "sinks", "lake"},
    "jobs": {"config", "sinks", "lake", "ingest"},
    "ops": {"config"},
    "cli": {"config", "sinks", "lake", "ingest", "jobs", "ops"},
}
#: top-level packages → the project packages each may import
PACKAGES: dict[str, set[str]] = {
    "shared": set(),
    "edge_agent": {"shared"},
    "cloud_ingest": {"shared"},
    "firmware_sim": {"shared"},
    "devstack": {"shared", "edge_agent", "cloud_ingest", "firmware_sim"},
}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _layer(module: str) -> str:
    part = module.split(".")[1] if "." in module else "config"
    return "config" if part in ("config", "sample") else part


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_packages_import_only_what_they_build_on(package: str) -> None:
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top in PACKAGES and top != package and top not in PACKAGES[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not wrong, "\n".join(wrong)


def test_cloud_ingest_folders_import_only_downwards() -> None:
    pkg = ROOT / "cloud_ingest"
    assert {p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == (
        set(CLOUD_LAYERS) - {"config"}
    ), "a folder of cloud_ingest/ is missing from CLOUD_LAYERS (and from docs/architecture.md)"
    wrong = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        mine = _layer(".".join(rel.parts))
        for mod in _imports(path):
            if not mod.startswith("cloud_ingest.") and mod != "cloud_ingest":
                continue
            theirs = _layer(mod)
            if theirs not in CLOUD_LAYERS:  # `from cloud_ingest import lake`: a folder
                continue
            if theirs != mine and theirs not in CLOUD_LAYERS[mine]:
                wrong.append(f"{rel}.py ({mine}) imports {mod} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_every_module_logs_under_its_own_name() -> None:
    hard_coded = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if 'getLogger("' in path.read_text() or "getLogger('" in path.read_text()
    ]
    assert not hard_coded, f"getLogger(__name__), not a name by hand: {hard_coded}"


def test_every_edge_counter_comes_from_the_registry() -> None:
    """The agent counts only names edge_agent/counters.py makes (mypy holds it to
    that: add_counter takes a CounterName); the scan catches a count that a cast or
    an Any would let through."""
    import re

    calls = [
        (str(path.relative_to(ROOT)), arg)
        for path in sorted((ROOT / "edge_agent").rglob("*.py"))
        for arg in re.findall(
            r"(?:add_counter|counts\.add|app\.count)\(\s*([^,)\n]+)", path.read_text()
        )
    ]
    assert len(calls) >= 40, calls  # the scan sees the calls
    made_here = ("counters.", "name", "counter_names.", "QUARANTINE_DROPPED", "self")
    wrong = [c for c in calls if not c[1].startswith(made_here)]
    assert not wrong, wrong


def test_the_drops_the_agent_reports_are_the_ones_the_cloud_knows() -> None:
    """The health report carries the ``dropped_*`` counters; the cloud gives each of
    KNOWN_DROPS a field of its own and adds any other into ``dropped_other``."""
    from edge_agent import counters
    from shared.health import KNOWN_DROPS

    assert set(counters.DROPS) == set(KNOWN_DROPS)
    assert all(counters.is_registered(n) for n in counters.FIXED)
    assert counters.is_registered("source_modbus-1_errors")
    assert counters.is_registered("quarantined_bad-json")
    assert not counters.is_registered("source_modbus-1_error")
    assert not counters.is_registered("readings_storred")
