"""InfluxDB sinks: the v2 write API via influxdb-client, and the v1 ``/write`` API.

``classify_status`` is the one switch on InfluxDB's answer, and it asks whose
fault a refusal is:

* the server takes nothing now (connection errors, timeouts, 429, 5xx, and the
  operator errors 401/403/404): retryable, everything waits;
* the server's state refuses this write (a series or tag-value limit reached,
  which any device may have filled; a field whose type another writer set; a
  request over the server's size limit, 413): :class:`SinkLimitError`, the write
  is deferred and its device sends it again, while other writes go through;
* the write itself is at fault (line protocol the server cannot parse, points
  beyond the retention policy): permanent, quarantined.

InfluxDB 1.x answers a write that breaks a limit with HTTP 400 and a body such as
``partial write: max-values-per-tag limit exceeded (100000/100000): …``; 2.x and
Cloud with 400, 413 or 422 and a JSON body. The phrases below are theirs.
"""

from __future__ import annotations

import urllib.parse

import urllib3

from cloud_ingest.config import InfluxConfig
from shared.errors import PermanentSinkError, RetryableSinkError, SinkError, SinkLimitError


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


#: 4xx answers that mean "this server is not ready for any data" (credentials,
#: a missing database or bucket): fixed by an operator, not by changing the batch,
#: so they are retried rather than quarantining every batch that arrives meanwhile.
OPERATOR_STATUSES = frozenset({401, 403, 404})


#: a refusal for the server's state, not the write's: InfluxDB 1.x
#: (tsdb/index and coordinator errors) and 2.x/Cloud (cardinality and quota limits)
SERVER_STATE_PHRASES = (
    "max-values-per-tag",
    "max-series-per-database",
    "field type conflict",
    "series cardinality",
    "cardinality limit",
    "limit exceeded",
    "quota",
)


def classify_status(status: int, body: str, retry_after: str | None) -> SinkError:
    msg = f"InfluxDB answered HTTP {status}: {body[:300]}"
    if status == 429 or status >= 500 or status in OPERATOR_STATUSES:
        return RetryableSinkError(msg, _retry_after(retry_after))
    text = body.lower()
    if status == 413 or any(p in text for p in SERVER_STATE_PHRASES):
        return SinkLimitError(msg)
    return PermanentSinkError(msg)


class InfluxV1Sink:
    """POST line protocol to ``/write`` (InfluxDB 1.x)."""

    def __init__(self, cfg: InfluxConfig) -> None:
        params = {"db": cfg.database, "precision": "ns"}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        self.url = cfg.url.rstrip("/") + "/write?" + urllib.parse.urlencode(params)
        self.headers = {"Content-Type": "text/plain; charset=utf-8"}
        if cfg.username:  # in a header, not the URL: URLs end up in logs
            self.headers.update(
                urllib3.make_headers(basic_auth=f"{cfg.username}:{cfg.password_value()}")
            )
        self.http = urllib3.PoolManager(
            timeout=urllib3.Timeout(total=cfg.timeout_s), retries=False, maxsize=4
        )

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        try:
            resp = self.http.request(
                "POST",
                self.url,
                body="\n".join(lines).encode(),
                headers=self.headers,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise RetryableSinkError(f"InfluxDB unreachable: {exc}") from None
        if resp.status != 204 and resp.status != 200:
            raise classify_status(
                resp.status, resp.data.decode(errors="replace"), resp.headers.get("Retry-After")
            )

    def close(self) -> None:
        self.http.clear()


class InfluxV2Sink:
    """Write through influxdb-client's synchronous write API (InfluxDB 2.x/3.x/Cloud/1.8+)."""

    def __init__(self, cfg: InfluxConfig) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.cfg = cfg
        self.client = InfluxDBClient(
            url=cfg.url,
            token=cfg.token_value(),
            org=cfg.org,
            timeout=int(cfg.timeout_s * 1000),
            retries=False,
        )
        self.api = self.client.write_api(write_options=SYNCHRONOUS)

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        from influxdb_client.client.exceptions import InfluxDBError
        from influxdb_client.domain.write_precision import WritePrecision

        try:
            self.api.write(
                bucket=self.cfg.bucket,
                org=self.cfg.org or "-",
                record="\n".join(lines),
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]  # a str constant
            )
        except InfluxDBError as exc:
            status = getattr(exc, "status", None) or getattr(exc.response, "status", None)
            if status is None:
                raise RetryableSinkError(f"InfluxDB write failed: {exc}") from None
            raise classify_status(int(status), str(exc.message), exc.retry_after) from None
        except urllib3.exceptions.HTTPError as exc:
            raise RetryableSinkError(f"InfluxDB unreachable: {exc}") from None

    def close(self) -> None:
        self.api.close()
        self.client.close()


def make_point_sink(cfg: InfluxConfig) -> InfluxV1Sink | InfluxV2Sink:
    return InfluxV1Sink(cfg) if cfg.api == "v1" else InfluxV2Sink(cfg)
