"""The Ansible deployment (ansible/), run for real against this machine.

``ansible-playbook -c local`` runs site.yml with every path under a prefix and
systemd's actions off (no systemd runs as PID 1 here), twice: the second run
changes nothing. Then what it installed runs: the cloud broker from its generated
listener settings (TLS, client certificates, the ACL), the device broker,
cloud-ingest and the edge agent from their virtualenvs and configs, and
Prometheus from its generated config, on free loopback ports; a reading published
with mosquitto_pub reaches InfluxDB, and the agent's health reaches Prometheus.
``ansible-lint`` passes with the production profile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import influxq
from devstack.pipeline import BIN
from devstack.services import (
    DEVICE_PERSISTENCE,
    DEVICE_QUEUE_QOS0,
    Service,
    free_port,
    http_ok,
    tcp_open,
    wait_until,
)
from shared.acks import device_key

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
DEVICE = "dev-ansible"
INGESTOR = "cloud-ingest-localhost"


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not installed (scripts/setup.sh dev installs it)"
    return str(path)


def ansible_env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
    }


def test_ansible_lint_passes_the_production_profile(tmp_path: Path) -> None:
    res = subprocess.run(
        [tool("ansible-lint"), "--profile", "production", "--offline", "--nocolor"],
        cwd=ANSIBLE,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "Profile 'production' was required, and it passed" in out


class Deployment:
    """A prefix, the files the playbook needs (wheel, PKI), and its inventory."""

    def __init__(self, tmp: Path, influx: Service) -> None:
        self.tmp = tmp
        self.prefix = tmp / "prefix"
        self.ports = {k: free_port() for k in ("cloud_mqtt", "edge_mqtt", "metrics")}
        self.influx = influx
        dist = tmp / "dist"
        subprocess.run(
            [str(BIN / "python"), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), "."],
            cwd=ROOT,
            check=True,
            timeout=300,
        )
        (self.wheel,) = dist.glob("iot_telemetry-*.whl")
        self.pki = tmp / "pki"
        ci = tool("cloud-ingest")
        subprocess.run([ci, "pki", "init", "--dir", str(self.pki)], check=True, capture_output=True)
        for name in (DEVICE, INGESTOR):
            subprocess.run(
                [ci, "pki", "issue", "--dir", str(self.pki), name], check=True, capture_output=True
            )
        subprocess.run(
            [ci, "pki", "issue", "--dir", str(self.pki), "--server", "127.0.0.1"],
            check=True,
            capture_output=True,
        )
        self.master = os.urandom(32)
        # the operators' command key (docs/commands.md): its public half to the device
        subprocess.run(
            [ci, "command", "keygen", "--id", "ops-1", "--dir", str(tmp / "ops")],
            check=True,
            capture_output=True,
        )
        self.inventory = tmp / "inventory.json"
        self.inventory.write_text(json.dumps(self._inventory()))

    def path(self, p: str) -> Path:
        return self.prefix / p.lstrip("/")

    def _inventory(self) -> dict[str, Any]:
        p, pki, issued = self.path, self.pki, self.pki / "issued"
        host: dict[str, Any] = {
            "influxdb_bind": f"127.0.0.1:{self.influx.port}",
            "influxdb_running": True,
            "influxdb_dropin_dir": str(p("/etc/systemd/system/influxdb.service.d")),
            "cloud_ingest_state_dir": str(p("/var/lib/cloud-ingest")),
            "cloud_ingest_mqtt_port": self.ports["cloud_mqtt"],
            "cloud_ingest_tls_ca_src": str(pki / "ca.pem"),
            "cloud_ingest_tls_cert_src": str(issued / f"{INGESTOR}.pem"),
            "cloud_ingest_tls_key_src": str(issued / f"{INGESTOR}.key"),
            "cloud_ingest_ack_master_key": self.master.hex(),
            "cloud_ingest_influx_url": self.influx.url,
            "cloud_ingest_http_listen": f"127.0.0.1:{self.ports['metrics']}",
            "cloud_broker_listener": f"{self.ports['cloud_mqtt']} 127.0.0.1",
            "cloud_broker_conf_dir": str(p("/etc/mosquitto/conf.d")),
            "cloud_broker_files_dir": str(p("/etc/mosquitto/telemetry")),
            "cloud_broker_ca_src": str(pki / "ca.pem"),
            "cloud_broker_cert_src": str(issued / "127.0.0.1.pem"),
            "cloud_broker_key_src": str(issued / "127.0.0.1.key"),
            "cloud_broker_crl_src": str(pki / "crl.pem"),
            "monitoring_prometheus_dir": str(p("/etc/prometheus")),
            "monitoring_grafana_provisioning_dir": str(p("/etc/grafana/provisioning")),
            "monitoring_grafana_dashboards_dir": str(p("/var/lib/grafana/dashboards")),
            "edge_broker_conf_dir": str(p("/etc/mosquitto-edge/conf.d")),
            "edge_broker_port": self.ports["edge_mqtt"],
            "edge_agent_device_id": DEVICE,
            "edge_agent_state_dir": str(p("/var/lib/edge-agent")),
            "edge_agent_local_port": self.ports["edge_mqtt"],
            "edge_agent_cloud_host": "127.0.0.1",
            "edge_agent_cloud_port": self.ports["cloud_mqtt"],
            "edge_agent_tls_ca_src": str(pki / "ca.pem"),
            "edge_agent_tls_cert_src": str(issued / f"{DEVICE}.pem"),
            "edge_agent_tls_key_src": str(issued / f"{DEVICE}.key"),
            "edge_agent_ack_key": device_key(self.master, DEVICE).hex(),
            "edge_agent_health_interval_s": 5,
            "edge_agent_command_keys": [
                {"id": "ops-1", "src": str(self.tmp / "ops" / "ops-1.pub")}
            ],
            # docs/devices.md's ESPHome recipe, and a static tag, through the role
            "edge_agent_tags": ["site=lab"],
            "edge_agent_config_extra": (
                '[[intake.sources]]\nname = "esphome"\n'
                'topic = "esphome/{node}/+/{sensor}/state"\nformat = "value"\n'
            ),
        }
        return {
            "all": {
                "vars": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": "/usr/bin/python3",
                    "telemetry_systemd": False,
                    "telemetry_wheel": str(self.wheel),
                    "telemetry_root": str(p("/opt/iot-telemetry")),
                    "telemetry_etc": str(p("/etc/iot-telemetry")),
                    "telemetry_systemd_dir": str(p("/etc/systemd/system")),
                    "telemetry_docs_src": str(ROOT / "docs"),
                },
                "children": {
                    "cloud": {"hosts": {"localhost": host}},
                    "edge": {"hosts": {"localhost": {}}},
                },
            }
        }

    def playbook(self) -> str:
        for d in ("/etc/mosquitto/conf.d", "/etc/mosquitto-edge/conf.d", "/etc/prometheus"):
            self.path(d).mkdir(parents=True, exist_ok=True)  # the packages' own folders
        res = subprocess.run(
            [tool("ansible-playbook"), "-c", "local", "-i", str(self.inventory), "site.yml"],
            cwd=ANSIBLE,
            env=ansible_env(self.tmp),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
        return res.stdout


def recap(out: str) -> dict[str, int]:
    line = re.search(r"^localhost\s*:\s*(.*)$", out, re.MULTILINE)
    assert line, out[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line[1])}


def mosquitto(dep: Deployment, name: str, conf_dir: str, port: int) -> Service:
    """Mosquitto as Debian's mosquitto.conf runs it: include_dir the conf.d folder the
    playbook wrote into."""
    work = dep.tmp / name
    work.mkdir()
    (work / "mosquitto.conf").write_text(
        f"include_dir {dep.path(conf_dir)}\nuser root\npersistence true\n"
        f"persistence_location {work}/\nlog_dest stdout\n"
    )
    argv = [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")]
    return Service(name, argv, port, work, health=lambda: tcp_open(port))


@pytest.fixture
def started() -> Iterator[list[Service]]:
    services: list[Service] = []
    yield services
    for s in reversed(services):
        s.stop()


def prom_query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        result: list[dict[str, Any]] = json.loads(resp.read())["data"]["result"]
    return result


def test_the_playbook_deploys_twice_and_what_it_deployed_runs(
    fresh: Callable[[str], Service], tmp_path: Path, started: list[Service]
) -> None:
    influx = fresh("influxdb")
    dep = Deployment(tmp_path, influx)

    first = recap(dep.playbook())
    assert first["failed"] == 0 and first["changed"] > 0
    second = recap(dep.playbook())
    assert second["failed"] == 0 and second["changed"] == 0, second

    # the units it wrote verify, against the programs it installed
    units = sorted(dep.path("/etc/systemd/system").glob("*.service")) + sorted(
        dep.path("/etc/systemd/system").glob("*.timer")
    )
    assert [u.name for u in units] == [
        "cloud-ingest-compact.service",
        "cloud-ingest-rollup.service",
        "cloud-ingest.service",
        "edge-agent.service",
        "cloud-ingest-compact.timer",
        "cloud-ingest-rollup.timer",
    ]
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed"
    res = subprocess.run(
        [analyze, "verify", *map(str, units)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    # Grafana's provisioning: the datasources, the folder, the four dashboards
    grafana = dep.path("/etc/grafana/provisioning")
    assert (grafana / "datasources" / "iot-telemetry.yml").exists()
    assert (grafana / "dashboards" / "iot-telemetry.yml").exists()
    assert sorted(p.name for p in dep.path("/var/lib/grafana/dashboards").glob("*.json")) == [
        "iot-alerts.json",
        "iot-cloud-ingest.json",
        "iot-device.json",
        "iot-fleet.json",
    ]
    databases = influxq.influxql(influx.url, "SHOW DATABASES")["results"][0]["series"][0]
    assert ["telemetry"] in databases["values"]  # the influxdb role created it

    # the device broker saves what it holds as devstack's does (test_power_cut.py)
    edge_conf = dep.path("/etc/mosquitto-edge/conf.d/telemetry-edge.conf").read_text()
    want = (DEVICE_PERSISTENCE + DEVICE_QUEUE_QOS0).splitlines()
    assert set(want) <= set(edge_conf.splitlines()), edge_conf

    # now run what it deployed
    p = dep.ports
    for svc in (
        mosquitto(dep, "cloud-broker", "/etc/mosquitto/conf.d", p["cloud_mqtt"]),
        mosquitto(dep, "edge-broker", "/etc/mosquitto-edge/conf.d", p["edge_mqtt"]),
    ):
        started.append(svc.start())
    etc = dep.path("/etc/iot-telemetry")
    ingest = Service(
        "cloud-ingest",
        [
            str(dep.path("/opt/iot-telemetry/cloud/bin/cloud-ingest")),
            "run",
            "-c",
            str(etc / "cloud-ingest.toml"),
        ],
        p["metrics"],
        tmp_path,
        health=lambda: http_ok(f"http://127.0.0.1:{p['metrics']}/healthz"),
    )
    started.append(ingest.start())
    agent_cfg = etc / "edge-agent.toml"
    # the command key is on the device, and in the config that `config check` passed
    assert (etc / "commands-ops-1.pub").read_bytes() == (
        tmp_path / "ops" / "ops-1.pub"
    ).read_bytes()
    assert f'{{ id = "ops-1", file = "{etc}/commands-ops-1.pub" }}' in agent_cfg.read_text()
    ready = tmp_path / "agent.ready"  # subscribed to the device broker (systemd: READY=1)
    agent = Service(
        "edge-agent",
        [
            str(dep.path("/opt/iot-telemetry/edge/bin/edge-agent")),
            "run", "-c", str(agent_cfg), "--ready-file", str(ready),
        ],
        0,
        tmp_path,
        health=ready.exists,
    )  # fmt: skip
    started.append(agent.start(timeout_s=180))
    prom_port = free_port()
    prom = Service(
        "prometheus",
        [
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={dep.path('/etc/prometheus/prometheus.yml')}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        prom_port,
        tmp_path,
        health=lambda: http_ok(f"http://127.0.0.1:{prom_port}/-/ready"),
    )
    started.append(prom.start())

    # a node publishes 30 readings with mosquitto_pub; the technician flushes
    t0 = (time.time_ns() // 10**10 - 6) * 10**10
    chunk = {"ts": [t0 + k * 10**8 for k in range(30)], "values": [20.0 + k for k in range(30)]}
    subprocess.run(
        [
            shutil.which("mosquitto_pub") or "mosquitto_pub",
            "-h", "127.0.0.1", "-p", str(p["edge_mqtt"]), "-q", "1",
            "-t", "sensors/node-1/temperature", "-m", json.dumps(chunk),
        ],
        check=True,
        timeout=30,
    )  # fmt: skip
    subprocess.run(
        [
            shutil.which("mosquitto_pub") or "mosquitto_pub",
            "-h", "127.0.0.1", "-p", str(p["edge_mqtt"]), "-q", "1",
            "-t", "esphome/esp-1/sensor/temperature/state", "-m", "21.5",
        ],
        check=True,
        timeout=30,
    )  # fmt: skip
    edge_agent = str(dep.path("/opt/iot-telemetry/edge/bin/edge-agent"))

    def readings_in_influx() -> int:
        subprocess.run(
            [edge_agent, "flush", "--timeout", "5", "-c", str(agent_cfg)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        return influxq.total_count(influxq.v1_windows(influx.url, "telemetry"))

    wait_until(lambda: readings_in_influx() == 31, 120, "the readings in InfluxDB")
    tagged = influxq.rows(
        influx.url, 'SELECT sum("count") FROM "window" WHERE site = \'lab\'', "telemetry"
    )
    assert tagged and tagged[0]["sum"] == 31  # every window has the device's tag
    health = influxq.rows(
        influx.url, f"SELECT state FROM agent_health WHERE device_id = '{DEVICE}'", "telemetry"
    )
    assert health and health[0]["state"] in ("ok", "behind", "link-down")
    # the device's health, as the generated Prometheus config scrapes it
    wait_until(
        lambda: bool(prom_query(prom_port, f'edge_agent_ok{{device_id="{DEVICE}"}}')),
        90,
        "the device's health in Prometheus",
    )
    # signed acks verified: the agent acted on them
    status = subprocess.run(
        [edge_agent, "status", "--json", "-c", str(agent_cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    counters = json.loads(status.stdout)["counters"]
    assert counters["batches_acked"] >= 1 and "acks_unverified" not in counters


@pytest.mark.parametrize(
    ("role", "extra", "words"),
    [
        (
            "edge_broker",
            {"edge_broker_bind": "0.0.0.0"},
            "edge_broker_bind is 0.0.0.0 and edge_broker_password_file is empty",
        ),
        ("edge_agent", {}, "edge_agent_ack_key is empty"),
        ("cloud_ingest", {}, "cloud_ingest_ack_master_key is empty"),
    ],
)
def test_the_roles_refuse_an_open_broker_and_unverified_acks(
    tmp_path: Path, role: str, extra: dict[str, str], words: str
) -> None:
    """A device broker anonymous beyond loopback, an agent that would act on any ack,
    an ingestor that would not sign them: each role stops at its first task (after
    the shared `telemetry` role it depends on) with one message naming the variable."""
    play = tmp_path / "play.yml"
    play.write_text(f"- hosts: all\n  gather_facts: false\n  roles: [{role}]\n")
    prefix = tmp_path / "root"
    variables = {
        "ansible_python_interpreter": "/usr/bin/python3",
        "telemetry_root": str(prefix / "opt"),
        "telemetry_etc": str(prefix / "etc"),
        "telemetry_systemd": False,
        "telemetry_docs_src": str(ROOT / "docs"),
        "edge_broker_conf_dir": str(prefix / "conf.d"),
        **extra,
    }
    res = subprocess.run(
        [tool("ansible-playbook"), "-i", "localhost,", "-c", "local", str(play),
         "-e", json.dumps(variables)],
        cwd=ANSIBLE, env={**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles")},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode != 0
    out = " ".join(res.stdout.split())
    assert words in out, res.stdout[-3000:]
    assert "failed=1" in out and not (prefix / "conf.d").exists()  # the role did nothing
