"""``/query`` on the HTTP intake: the two statements InfluxDB 1.x clients send
before they write, answered as InfluxDB 1.x answers them, so that they start
without a warning.

* Telegraf's ``outputs.influxdb`` sends ``CREATE DATABASE "telegraf"`` at start
  (unless ``skip_database_creation``);
* Node-RED's InfluxDB nodes (node-influx) may list databases with ``SHOW
  DATABASES`` and create theirs.

The agent keeps no databases: ``CREATE DATABASE`` succeeds (as it does in
InfluxDB when the database exists), and ``SHOW DATABASES`` lists the names
created since the agent started (at most :data:`MAX_NAMES`). Any other statement
is refused with 400 and a message saying where queries go. The response shapes
are InfluxDB 1.x's (https://docs.influxdata.com/influxdb/v1/tools/api/#query-http-endpoint).
"""

from __future__ import annotations

import re
import threading
from typing import Any

MAX_NAMES = 100
MAX_QUERY = 4096
_CREATE = re.compile(r'^\s*CREATE\s+DATABASE\s+("(?:[^"\\]|\\.)+"|[A-Za-z0-9_.\-]+)(\s+.*)?$', re.I)
_SHOW = re.compile(r"^\s*SHOW\s+DATABASES\s*$", re.I)


class Databases:
    """The names clients created (bounded), for ``SHOW DATABASES``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: list[str] = []

    def add(self, name: str) -> None:
        with self._lock:
            if name not in self._names and len(self._names) < MAX_NAMES:
                self._names.append(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)


def answer(q: str, dbs: Databases) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for the statements in ``q`` (``;`` between them)."""
    if not q.strip():
        return 400, {"error": 'missing required parameter "q"'}
    if len(q) > MAX_QUERY:
        return 400, {"error": f"a query of more than {MAX_QUERY} characters"}
    results: list[dict[str, Any]] = []
    for i, stmt in enumerate(s for s in q.split(";") if s.strip()):
        m = _CREATE.match(stmt)
        if m:
            name = m.group(1)
            dbs.add(name[1:-1].replace('\\"', '"') if name.startswith('"') else name)
            results.append({"statement_id": i})
        elif _SHOW.match(stmt):
            series: dict[str, Any] = {"name": "databases", "columns": ["name"]}
            names = dbs.names()
            if names:
                series["values"] = [[n] for n in names]
            results.append({"statement_id": i, "series": [series]})
        else:
            return 400, {
                "error": f"the edge agent takes writes; {stmt.strip()[:60]!r} is not "
                "CREATE DATABASE or SHOW DATABASES (queries go to the cloud's InfluxDB)"
            }
    return 200, {"results": results}
