"""Reading InfluxDB with InfluxQL, for the fleet report (cloud_ingest/jobs/report.py).

One GET to ``/query``: InfluxDB 1.x, or 2.x/3.x through their v1-compatible
endpoint (the bucket mapped to a database, DBRP). Credentials as the sinks use
them: a username and password (1.x) or a token (2.x). Errors become one
:class:`~shared.errors.SinkError` with a line for the user, here and nowhere else.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

import urllib3

from cloud_ingest.config import InfluxConfig
from shared.errors import SinkError


@dataclass(frozen=True)
class Series:
    name: str
    tags: dict[str, str]
    columns: list[str]
    values: list[list[Any]]

    def rows(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, v, strict=True)) for v in self.values]


class InfluxQLReader:
    def __init__(self, cfg: InfluxConfig) -> None:
        self.url = cfg.url.rstrip("/") + "/query"
        self.database = cfg.database if cfg.api == "v1" else cfg.bucket
        self.headers: dict[str, str] = {}
        if cfg.api == "v2" and cfg.token_value():
            self.headers["Authorization"] = f"Token {cfg.token_value()}"
        elif cfg.username:  # in a header, not the URL: URLs end up in logs
            self.headers.update(
                urllib3.make_headers(basic_auth=f"{cfg.username}:{cfg.password_value()}")
            )
        self.http = urllib3.PoolManager(
            timeout=urllib3.Timeout(total=max(cfg.timeout_s, 30.0)), retries=False, maxsize=2
        )

    def query(self, q: str) -> list[Series]:
        """The series of one statement (none when it matched nothing)."""
        params = urllib.parse.urlencode({"db": self.database, "q": q, "epoch": "ns"})
        try:
            resp = self.http.request("GET", f"{self.url}?{params}", headers=self.headers)
        except urllib3.exceptions.HTTPError as exc:
            raise SinkError(f"InfluxDB unreachable at {self.url}: {exc}") from None
        body = resp.data.decode(errors="replace")
        if resp.status != 200:
            raise SinkError(f"InfluxDB answered HTTP {resp.status} to a query: {body[:300]}")
        try:
            result = json.loads(body)["results"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise SinkError(f"InfluxDB's answer is not a query result: {body[:300]}") from None
        if "error" in result:
            raise SinkError(f"InfluxDB: {result['error']} (in {q[:200]})")
        return [
            Series(s.get("name", ""), s.get("tags") or {}, s["columns"], s["values"])
            for s in result.get("series", [])
        ]

    def close(self) -> None:
        self.http.clear()
