"""The archive: an object store for the data lake (``cloud_ingest/lake/``) and quarantine.

Two backends with the same layout:

* ``s3://bucket/prefix`` — boto3 to AWS S3, MinIO or any S3 endpoint. A
  ``PutObject`` is atomic: readers see the old object or the whole new one.
* ``file:///some/dir`` — a local directory (the single-machine default). Each
  object is written to a temporary file in the same folder, fsynced and renamed
  into place, so no partial object is ever visible.

Keys (see ``docs/cloud-ingest.md``)::

    aggregates/dt=<day>/part-<group>.parquet                          windows of a group of batches
    alerts/dt=<day>/device_id=<id>/seq=<seq, 20 digits>.parquet       alert events
    quarantine/reason=<reason>/<sha256 of payload>.bin                rejected input
    quarantine/reason=<reason>/<sha256 of payload>.json               why, where from, when

A resend of an alert, or of a quarantined message, overwrites the same keys.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from cloud_ingest.config import ArchiveConfig
from shared.errors import PermanentSinkError, RetryableSinkError, SinkLimitError


def _private_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents as 0750: the lake is not world-readable
    (its folder names alone are the fleet's device ids)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir(mode=0o750, exist_ok=True)


class LocalArchive:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        # Keys are built by this project, but check without touching the disk
        # (resolve() per object was a measurable cost at thousands of puts/s).
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise PermanentSinkError(f"archive key {key!r} escapes the archive root")
        return self.root.joinpath(*parts)

    def local_path(self, key: str) -> Path:
        """Where object ``key`` is on this machine's disk (the jobs' engines read it there)."""
        return self._path(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            _private_dirs(path.parent)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
            try:
                os.fchmod(fd, 0o640)  # the owner and its group (analysts), nobody else
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise RetryableSinkError(f"archive write to {path} failed: {exc}") from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            raise RetryableSinkError(f"archive read of {key} failed: {exc}") from None

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise RetryableSinkError(f"archive delete of {key} failed: {exc}") from None

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        try:
            if self.root.exists() and not self.root.is_dir():
                raise NotADirectoryError(f"the archive root {self.root} is not a directory")
            if not base.exists():
                return []
            return sorted(
                str(p.relative_to(self.root))
                for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".tmp-")
            )
        except OSError as exc:
            raise RetryableSinkError(f"archive list of {prefix} failed: {exc}") from None

    def close(self) -> None:
        pass


class S3Archive:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        region: str,
        max_connections: int = 16,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region,
            config=Config(
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
                # one connection per concurrent put (botocore's default pool is 10)
                max_pool_connections=max_connections,
            ),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, exc: BotoCoreError | ClientError, what: str) -> Exception:
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("EntityTooLarge", "InvalidArgument", "KeyTooLongError"):
                # the store will not take this object: its keys and sizes are ours, and
                # it holds the rows of many devices, so it is not one batch's fault
                return SinkLimitError(f"S3 {what} refused: {code}")
            # 5xx, throttling, but also NoSuchBucket/AccessDenied: operator problems that
            # are fixed outside this process; retrying keeps the data instead of dropping it.
            return RetryableSinkError(f"S3 {what} failed: {code or exc}")
        return RetryableSinkError(f"S3 {what} failed: {exc}")

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, "put") from None

    def get(self, key: str) -> bytes:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))[
                "Body"
            ].read()
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, "get") from None
        return body

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, "delete") from None

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, "list") from None
        return sorted(keys)

    def close(self) -> None:
        self.client.close()


def open_archive(cfg: ArchiveConfig) -> LocalArchive | S3Archive:
    if cfg.url.startswith("s3://"):
        bucket, _, prefix = cfg.url[len("s3://") :].partition("/")
        return S3Archive(
            bucket,
            prefix,
            endpoint_url=cfg.s3_endpoint_url or None,
            region=cfg.s3_region,
            max_connections=cfg.max_concurrent_puts,
        )
    return LocalArchive(cfg.url[len("file://") :])
