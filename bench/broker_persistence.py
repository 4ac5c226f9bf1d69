"""What a power cut costs on the device broker, per Mosquitto persistence setting.

For each setting, a real Mosquitto (persistence on, its file in a fresh folder)
takes --rate one-reading QoS 1 messages per second from a publisher for
--seconds, while a subscriber with the agent's kind of session (persistent,
QoS 1, clean start off) either reads them (the agent **running**) or is away
(the agent **stopped**: the broker queues them for its session). Then the
broker is SIGKILLed (a power cut: no chance to save) and started again on the
same file; the publisher goes on (it resends what the broker had not
acknowledged), the subscriber comes back after --reconnect-s (the agent's
reconnect delay), and every message the broker acknowledged is looked for.

Reported per setting and mode:

* **lost**: messages the broker acknowledged to the publisher that the
  subscriber never got (the broker forgot them, or had no session to queue
  them in after the restart);
* **writes/hour**: bytes Mosquitto had written to the file system
  (``write_bytes`` of /proc/<pid>/io, counted as pages are dirtied; the
  persistence folder is on a disk, not tmpfs) during the --seconds, scaled to
  an hour: what the SD card takes.

Where the cut falls between two saves decides the loss, so each row is run
--repeats times with the cut moved by a fraction of a save's worth of messages
(lost: lowest–highest). Each save writes the broker's whole state, so
--retained-kb preloads retained messages (Zigbee2MQTT's ``bridge/devices`` is
tens to hundreds of KB) and --seconds sets how long the queue of a stopped
agent grows; --only picks settings by a word of their name.

    .venv/bin/python bench/broker_persistence.py [--rate 20] [--seconds 20]
        [--repeats 3] [--retained-kb 0] [--only 'every 100']
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from devstack.services import free_port, tcp_open, wait_until
from firmware_sim.run import Acks
from shared.mqttprops import connect_properties

#: name -> mosquitto.conf lines (persistence is on in all: Debian's default)
SETTINGS = {
    "autosave_interval 1800 (Debian's default)": "",
    "autosave_interval 60": "autosave_interval 60\n",
    "autosave_interval 5": "autosave_interval 5\n",
    "autosave_on_changes, every 100": "autosave_on_changes true\nautosave_interval 100\n",
    "autosave_on_changes, every 1": "autosave_on_changes true\nautosave_interval 1\n",
}
TOPIC = "esphome/bench/sensor/t/state"


class Broker:
    def __init__(self, folder: Path, lines: str) -> None:
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        run_as = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{run_as}"
            f"persistence true\npersistence_location {folder}/\n"
            f"max_queued_messages 0\n{lines}log_dest none\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)])
        wait_until(lambda: tcp_open(self.port), 20, "mosquitto to listen")

    def written(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
        return 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def client(cid: str, port: int) -> mqtt.Client:
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5
    )
    c.reconnect_delay_set(0.2, 1)
    c.max_queued_messages_set(0)  # never drop a message locally
    c.connect_async("127.0.0.1", port, clean_start=False, properties=connect_properties(86400))
    return c


def preload(port: int, kb: int) -> None:
    """``kb`` KB of retained messages, 4 KB each, as a bridge's device lists."""
    if kb <= 0:
        return
    c = client("retainer", port)
    acks = Acks()
    c.on_publish = acks.on_publish
    c.loop_start()
    wait_until(c.is_connected, 20, "the retainer")
    for i in range(max(1, kb // 4)):
        acks.track(c.publish(f"bench/retained/{i}", os.urandom(4096), qos=1, retain=True))
    wait_until(lambda: acks.pending() == 0, 30, "the retained messages' PUBACKs")
    c.disconnect()
    c.loop_stop()


def _measure(
    broker: Broker, running: bool, rate: float, seconds: float, reconnect_s: float
) -> tuple[int, int, int]:
    """(messages the broker acknowledged, lost, bytes written per hour)."""
    got: set[bytes] = set()
    lock = threading.Lock()

    def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        with lock:
            got.add(bytes(m.payload))

    def on_connect(c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        c.subscribe(TOPIC, qos=1)  # the agent subscribes at every connect

    sub = client("agent", broker.port)
    sub.on_message = on_message
    sub.on_connect = on_connect
    sub.loop_start()
    wait_until(sub.is_connected, 20, "the subscriber")
    time.sleep(0.5)  # the SUBACK; pacing, not a wait for a service
    if not running:
        sub.disconnect()
        sub.loop_stop()
    pub = client("node", broker.port)
    pub.loop_start()
    wait_until(pub.is_connected, 20, "the publisher")
    sent: dict[int, bytes] = {}  # packet id -> payload, while not acknowledged
    early: set[int] = set()  # acknowledged before publish() returned the id
    acked: set[bytes] = set()

    def on_publish(_c: mqtt.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        with lock:
            if mid in sent:
                acked.add(sent.pop(mid))
            else:
                early.add(mid)

    pub.on_publish = on_publish

    def send(payload: bytes) -> None:
        # no lock held across publish(): paho calls on_publish under its own lock
        info = pub.publish(TOPIC, payload, qos=1)
        with lock:
            if info.mid in early:
                early.remove(info.mid)
                acked.add(payload)
            else:
                sent[info.mid] = payload

    w0, t0 = broker.written(), time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        send(f"{n}".encode())
        n += 1
        time.sleep(max(0.0, t0 + n / rate - time.monotonic()))  # the publishing rate
    per_hour = int((broker.written() - w0) / (time.monotonic() - t0) * 3600)
    broker.kill()  # the power cut
    broker.start()
    t1 = time.monotonic()
    # the nodes go on publishing (and resend what was not acknowledged)
    while time.monotonic() - t1 < reconnect_s + 2:
        send(f"{n}".encode())
        n += 1
        time.sleep(max(0.0, t1 + (n - rate * seconds) / rate - time.monotonic()))
        if not running and time.monotonic() - t1 >= reconnect_s and not sub.is_connected():
            sub.reconnect_delay_set(0.2, 1)
            sub.connect_async("127.0.0.1", broker.port, clean_start=False,
                              properties=connect_properties(86400))  # fmt: skip
            sub.loop_start()
            running = True
    wait_until(lambda: not sent, 30, "every PUBACK")  # (a dict's len is atomic)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # polling what arrives, bounded
        with lock:
            if acked <= got:
                break
        time.sleep(0.05)
    with lock:
        lost = len(acked - got)
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return len(acked), lost, per_hour


def measure(
    lines: str, running: bool, rate: float, seconds: float, reconnect_s: float, retained_kb: int
) -> tuple[int, int, int]:
    """(messages the broker acknowledged, lost, bytes written per hour)."""
    folder = Path(tempfile.mkdtemp(prefix="broker-persist-"))
    broker = Broker(folder, lines)
    broker.start()
    try:
        preload(broker.port, retained_kb)
        return _measure(broker, running, rate, seconds, reconnect_s)
    finally:
        broker.kill()  # also when a measurement fails: no broker left behind
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=20.0, help="messages per second (20)")
    ap.add_argument("--seconds", type=float, default=20.0, help="before the cut (20)")
    ap.add_argument(
        "--reconnect-s",
        type=float,
        default=1.0,
        help="the subscriber's return after the restart (1.0)",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs per row, the cut moved between saves (3)"
    )
    ap.add_argument(
        "--retained-kb", type=int, default=0, help="retained messages the broker holds, KB (0)"
    )
    ap.add_argument("--only", default="", help="settings whose name has this text")
    ap.add_argument("--mode", choices=["both", "running", "stopped"], default="both")
    args = ap.parse_args()  # fmt: skip
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, mosquitto "
        f"{subprocess.run(['mosquitto', '-h'], capture_output=True, text=True).stdout.split()[2]},"
        f" {args.rate:g} messages/s for {args.seconds:g} s, then SIGKILL;"
        f" {args.retained_kb} KB retained; {args.repeats} cuts a row"
    )
    print(f"{'setting':44} {'mode':8} {'acked':>6} {'lost':>9} {'writes/hour':>13}")
    modes = {"both": (True, False), "running": (True,), "stopped": (False,)}[args.mode]
    for name, lines in SETTINGS.items():
        if args.only not in name:
            continue
        for running in modes:
            rows = [
                measure(
                    lines,
                    running,
                    args.rate,
                    # the cut moved by a fraction of 100 messages (a save's worth)
                    args.seconds + (i * 100 / args.repeats) / args.rate,
                    args.reconnect_s,
                    args.retained_kb,
                )
                for i in range(args.repeats)
            ]
            acked = min(r[0] for r in rows)
            lost = f"{min(r[1] for r in rows)}–{max(r[1] for r in rows)}"
            per_hour = max(r[2] for r in rows)
            mode = "running" if running else "stopped"
            print(f"{name:44} {mode:8} {acked:6d} {lost:>9} {per_hour / 1e6:10.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
