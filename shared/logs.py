"""Log output: text for people at a terminal, JSON Lines for log pipelines.

With ``log_format = "json"`` every record is one JSON object on stderr::

    {"ts": "2026-11-26T07:10:03.123Z", "level": "WARNING", "logger": "cloud_ingest.ingest.process",
     "msg": "quarantine: too-large on telemetry/v1/d1/batch: ...", "reason": "too-large",
     "topic": "telemetry/v1/d1/batch"}

Fields passed with ``extra=`` (``device_id``, ``seq``, ``reason``, ``topic``,
``stage`` ...) become keys of their own, so Loki, Elasticsearch or CloudWatch can
filter on them without parsing the message. Exceptions go in ``exc``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        obj: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


def setup_logging(level: str, fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
