"""``cloud-ingest``: the cloud side of the telemetry path.

``app`` defines the command group; ``run`` the service, ``jobs`` the jobs over the
lake, ``ops`` the operators' tools, ``command`` the commands to devices. Importing
them registers their commands."""

from cloud_ingest.cli import command, jobs, ops, run
from cloud_ingest.cli.app import main

__all__ = ["command", "jobs", "main", "ops", "run"]
