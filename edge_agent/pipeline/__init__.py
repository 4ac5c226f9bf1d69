"""The agent's pipeline, in the order a reading takes: intake (from the sources,
edge_agent/sources) into the buffer, alert rules, windows (with the kernels) into
the outbox, the forwarder to the cloud; the disk budget, the quarantine and the
health reports beside."""
