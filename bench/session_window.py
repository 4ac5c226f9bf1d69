"""The window after a device broker that forgot the agent's session.

A power cut before the broker's first save after it started (or with Debian's
30-minute autosave) brings it back without the agent's session: nothing is
queued for the agent until it has connected and subscribed again, and what the
nodes publish in between reaches no one. This measures that window with the real
agent.

A real Mosquitto (devstack's device broker), a real ``edge-agent run`` reading a
``format = "value"`` source, and a node (paho, QoS 1) that publishes a numbered
reading every --period-ms and comes back fast (0.1 s) after a lost link, so that
the window is the agent's alone. The broker is SIGKILLed, its persistence file
removed (it forgot), and started again after --outage seconds; the node's
numbers that the broker acknowledged and the agent never stored are the loss,
and the window runs from the broker's return to the acknowledgement of the last
of them. Each row is run with the agent's [intake.broker] reconnect_max_s as
given (--agent-max-s, several to compare).

    .venv/bin/python bench/session_window.py [--outage 1 --outage 10 --outage 30]
        [--agent-max-s 5 --agent-max-s 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from devstack.services import mosquitto, wait_until

BIN = Path(sys.executable).parent


class Node:
    """Publishes i = 0, 1, 2, ... every ``period_s``; remembers when each was acknowledged."""

    def __init__(self, port: int, period_s: float) -> None:
        self.period_s = period_s
        self.acked: dict[int, float] = {}  # number -> monotonic time of its PUBACK
        self._mids: dict[int, int] = {}  # packet id -> number, until its PUBACK
        self._early: dict[int, float] = {}
        self._lock = threading.Lock()
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="node-1",
            protocol=mqtt.MQTTv5,
        )  # fmt: skip
        self.c.reconnect_delay_set(1, 1)
        self.c._reconnect_min_delay = 0.1  # type: ignore[assignment]  # paho takes ints only
        self.c._reconnect_max_delay = 0.1  # type: ignore[assignment]
        self.c.max_queued_messages_set(0)
        self.c.on_publish = self._on_publish
        self.c.connect_async("127.0.0.1", port)
        self.c.loop_start()
        self.n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        now = time.monotonic()
        with self._lock:
            i = self._mids.pop(mid, None)
            if i is None:
                self._early[mid] = now  # acknowledged before publish() returned its id
            else:
                self.acked[i] = now

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            # no lock held across publish(): paho calls on_publish under its own
            info = self.c.publish("probe/node-1/n", str(self.n).encode(), qos=1)
            with self._lock:
                if info.mid in self._early:
                    self.acked[self.n] = self._early.pop(info.mid)
                else:
                    self._mids[info.mid] = self.n
            self.n += 1
            time.sleep(max(0.0, t0 + self.n * self.period_s - time.monotonic()))  # the rate

    def start(self) -> None:
        wait_until(self.c.is_connected, 20, "the node to connect")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        wait_until(lambda: not self._mids, 30, "the node's last PUBACKs")
        self.c.disconnect()
        self.c.loop_stop()


def stored_numbers(cfg: Path, out: Path) -> set[int]:
    subprocess.run(
        [str(BIN / "edge-agent"), "export", "-c", str(cfg), "--kind", "raw", "--since", "0",
         "-o", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    with open(out, encoding="utf-8", newline="") as fh:
        return {int(float(r["value"])) for r in csv.DictReader(fh)}


def measure(tmp: Path, outage_s: float, agent_max_s: float, period_s: float) -> tuple[int, float]:
    """(numbers lost, the window in seconds)."""
    broker = mosquitto(tmp / "broker")
    broker.start()
    agent: subprocess.Popen[bytes] | None = None
    node: Node | None = None
    try:
        cfg = tmp / "edge-agent.toml"
        cfg.write_text(
            f'device_id = "bench"\n[storage]\npath = "{tmp / "agent.sqlite"}"\n'
            f"[intake.broker]\nport = {broker.port}\nreconnect_max_s = {agent_max_s}\n"
            f"[forward.broker]\nport = {broker.port}\n"
            '[[intake.sources]]\nname = "probe"\ntopic = "probe/{node}/{sensor}"\n'
            'format = "value"\n'
        )
        ready = tmp / "ready"
        with open(tmp / "agent.log", "ab") as log:
            agent = subprocess.Popen(
                [str(BIN / "edge-agent"), "run", "-c", str(cfg), "--ready-file", str(ready)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(ready.exists, 60, "the agent to subscribe")
        node = Node(broker.port, period_s)
        node.start()
        time.sleep(1.0)  # pacing: a second of readings before the cut
        broker.kill()
        (broker.workdir / "mosquitto.db").unlink(missing_ok=True)  # it forgot
        time.sleep(outage_s)  # the outage being measured, not a wait for a service
        broker.start()
        back = time.monotonic()
        time.sleep(8.0)  # pacing: the window closes within the agent's reconnect_max_s
        node.stop()
        last = node.n - 1
        wait_until(
            lambda: last in stored_numbers(cfg, tmp / "raw.csv"), 60, "the node's last reading"
        )
        lost = set(node.acked) - stored_numbers(cfg, tmp / "raw.csv")
        window = max((node.acked[i] for i in lost), default=back) - back
        return len(lost), window
    finally:
        if node is not None and node.c.is_connected():
            node.c.loop_stop()
        if agent is not None:
            agent.terminate()
            agent.wait(30)
        broker.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage", type=float, action="append", help="seconds (1, 10, 30)")
    ap.add_argument(
        "--agent-max-s", type=float, action="append", help="the agent's reconnect_max_s (5, then 1)"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--period-ms", type=float, default=10.0, help="the node's period (10)")
    args = ap.parse_args()  # fmt: skip
    outages = args.outage or [1.0, 10.0, 30.0]
    maxes = args.agent_max_s or [5.0, 1.0]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus; a reading every "
        f"{args.period_ms:g} ms; {args.repeats} runs a row (lowest–highest)"
    )
    print(f"{'outage':>7} {'reconnect_max_s':>16} {'lost':>10} {'window':>14}")
    for outage in outages:
        for max_s in maxes:
            rows = []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory(prefix="session-window-") as d:
                    rows.append(measure(Path(d), outage, max_s, args.period_ms / 1000))
            lost = f"{min(r[0] for r in rows)}–{max(r[0] for r in rows)}"
            win = f"{min(r[1] for r in rows):.2f}–{max(r[1] for r in rows):.2f} s"
            print(f"{outage:6g}s {max_s:16g} {lost:>10} {win:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
