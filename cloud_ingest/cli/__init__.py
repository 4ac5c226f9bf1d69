"""``cloud-ingest``: the cloud side of the telemetry path.

``app`` defines the command group; ``run`` the service, ``jobs`` the jobs over the
lake, ``ops`` the operators' tools. Importing them registers their commands."""

from cloud_ingest.cli import jobs, ops, run
from cloud_ingest.cli.app import main

__all__ = ["jobs", "main", "ops", "run"]
