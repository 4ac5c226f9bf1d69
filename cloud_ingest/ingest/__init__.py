"""The streaming service (``cloud-ingest run``), in the order a message meets it.

``mqttclient`` holds the broker session, ``consume`` takes messages off it in groups,
``decode`` turns each into a batch or alert or a quarantine entry with a reason
(``quotas`` bounds what one device may cost the others), ``process`` runs a group,
``revisions`` keeps a window's revisions in order, ``writer`` (with ``coalesce``)
writes to the sinks and retries, and only then are the devices acked. ``registry``
remembers the devices seen, ``metrics`` serves /metrics and /healthz, ``watchdog``
tells systemd the loop is alive, and ``service`` puts them together."""
