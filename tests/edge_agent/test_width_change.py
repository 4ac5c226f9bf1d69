"""A window width changed under a running buffer (edge_agent/pipeline/window.py
adopt_width): windows before the switch keep the old width, windows from it have
the new one, late readings revise a window at the width it was closed with, and
every reading is in exactly one window, whatever the change and its timing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edge_agent import counters
from edge_agent.config import AgentConfig, WindowConfig
from edge_agent.pipeline import buffer, window
from edge_agent.store import Store
from shared.readings import ReadingChunk
from shared.wire import decode_batch

S = 10**9
T0 = 1_790_000_000 * S + 3 * S  # not on any window boundary


def config(width_s: float) -> AgentConfig:
    return AgentConfig(
        device_id="d", window=WindowConfig(width_s=width_s, lateness_s=2.0, max_age_s=600.0)
    )


def feed(store: Store, cfg: AgentConfig, ts: np.ndarray, tag: str) -> None:
    reg = buffer.SensorRegistry(store)
    late = buffer.LatePolicy(
        cfg.window.width_ns, cfg.window.max_age_ns, cfg.window.hop_ns, buffer.window_widths(store)
    )
    for k, t in enumerate(ts.tolist()):
        chunk = ReadingChunk("n", "s", "u", np.array([t]), np.array([float(t % 97)]))
        buffer.store_chunk(store, reg, chunk, f"{tag}{k}".encode(), late=late)


def windows(store: Store) -> dict[tuple[int, int], tuple[int, int]]:
    """(start, width) → (count, revision) of the newest version sent of each window."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for (payload,) in store.conn.execute("SELECT payload FROM outbox ORDER BY seq"):
        b = decode_batch(bytes(payload))
        for st, n, rev in zip(
            b.start_ns.tolist(), b.count.tolist(), b.revision.tolist(), strict=True
        ):
            key = (st, b.window.width_ns)
            if key not in out or out[key][1] < rev:
                out[key] = (n, rev)
    return out


@pytest.mark.parametrize(("before", "after"), [(10, 60), (60, 10), (10, 15), (20, 30)])
def test_every_reading_is_in_one_window_across_a_width_change(
    tmp_path: Path, before: int, after: int
) -> None:
    store = Store(tmp_path / "b.sqlite")
    old, new = config(before), config(after)
    first = T0 + np.arange(0, 200) * S  # 200 s at 1 Hz
    feed(store, old, first, "a")
    window.send_ready(store, old)  # closes up to the watermark, at the old width
    closed = store.get_state(buffer.CLOSED_UNTIL)
    # the agent starts again with the new width
    widths = window.adopt_width(store, new)
    switch = widths[-1][0]
    assert switch >= closed and switch % before == 0 and switch % after == 0
    second = T0 + np.arange(200, 500) * S
    feed(store, new, second, "b")
    window.send_ready(store, new)
    # late readings on both sides of the switch revise their windows at their widths
    late = np.array([closed - 5 * S, switch + 7 * S])
    late = late[late > T0]
    feed(store, new, late, "c")
    window.send_ready(store, new, flush=True)
    every = np.concatenate([first, second, late])
    got = windows(store)
    for (start, width), (n, _) in got.items():
        expected = int(((every >= start) & (every < start + width)).sum())
        assert n == expected, (start, width)
        assert width == (before if start < switch else after) * S
        assert start + width <= switch or start >= switch  # no window across the switch
    assert sum(n for n, _ in got.values()) == len(every)  # each reading in one window
    assert store.counters()[counters.WINDOW_WIDTH_CHANGES] == 1
    assert store.counters().get(counters.DROPPED_TOO_OLD, 0) == 0


def test_a_change_undone_before_it_began_leaves_no_trace(tmp_path: Path) -> None:
    """A desired config rolled back before a window of its width closed."""
    store = Store(tmp_path / "b.sqlite")
    feed(store, config(10), T0 + np.arange(0, 100) * S, "a")
    window.send_ready(store, config(10))
    assert len(window.adopt_width(store, config(60))) == 2
    assert window.adopt_width(store, config(10)) == ((0, 10 * S),)
    assert window.adopt_width(store, config(30))[-1][1] == 30 * S


def test_the_same_width_again_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "b.sqlite")
    cfg = config(10)
    assert window.adopt_width(store, cfg) == ((0, 10 * S),)
    assert window.adopt_width(store, dataclasses.replace(cfg)) == ((0, 10 * S),)
    hopping = AgentConfig(window=WindowConfig(width_s=60, hop_s=10, max_age_s=60))
    assert window.adopt_width(store, hopping) == ()  # hopping windows keep no record
