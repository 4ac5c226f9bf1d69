"""The sink contracts. Implementations are blocking; the service runs them in threads.

Every method raises only :class:`~shared.errors.RetryableSinkError` or
:class:`~shared.errors.PermanentSinkError`; each implementation translates its
client library's exceptions in one place.
"""

from __future__ import annotations

from typing import Protocol


class PointSink(Protocol):
    """Takes InfluxDB line protocol."""

    def write(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


class ObjectStore(Protocol):
    """A flat key → bytes store with atomic, overwriting puts (S3 or a directory)."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def list(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is not there."""
        ...

    def close(self) -> None: ...
