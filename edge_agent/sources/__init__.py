"""Input adapters: what sensors and devices send, turned into readings for the buffer.

Every adapter has the same small contract (:mod:`edge_agent.sources.contract`):
it takes the bytes of one message (an MQTT payload, an HTTP body, a Modbus poll)
and returns a :class:`~edge_agent.sources.contract.Decoded`: the readings, grouped
into one :class:`~shared.readings.ReadingChunk` per sensor, and the parts it could
not read, each with a reason for the quarantine. It never raises for bad input.

Every value is read by one rule (:mod:`edge_agent.sources.values`), and tagged
series are named by one rule (:mod:`edge_agent.sources.series`).

Formats (docs/devices.md has a recipe per device family):

* ``chunk``: the agent's own JSON chunk (shared/readings.py), unchanged;
* ``value``: one value per message (``21.5``, ``ON``, ``nan``), as ESPHome publishes;
* ``json``: an object whose fields are sensors (Tasmota, Zigbee2MQTT, Shelly);
* ``influx``: InfluxDB line protocol (Telegraf, InfluxDB clients, Node-RED);
* ``telegraf-json``: Telegraf's JSON output format;
* ``csv``: ``ts,value`` rows, a header row naming a sensor per column, or TOA5.
"""
