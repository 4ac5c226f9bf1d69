"""The technician's commands' libraries: each `edge-agent` command (edge_agent/cli.py)
is a thin call of one function here (status, sensors, tail, export, buffer
check/repair, doctor). They read the buffer through a read-only connection, so
they work beside a running agent and with no network."""
