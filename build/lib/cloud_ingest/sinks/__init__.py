"""Sinks: where validated batches are written (InfluxDB, the archive)."""
