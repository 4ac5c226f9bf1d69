"""Input adapters: what sensors and devices send, turned into readings for the buffer.

Every adapter has the same small contract (:mod:`edge_agent.sources.contract`):
it takes the bytes of one message (an MQTT payload, an HTTP body, a Modbus poll)
and returns a :class:`~edge_agent.sources.contract.Decoded`: the readings, grouped
into one :class:`~shared.readings.ReadingChunk` per sensor, and the parts it could
not read, each with a reason for the quarantine. It never raises for bad input.

Formats (docs/devices.md has a recipe per device family):

* ``chunk``: the agent's own JSON chunk (shared/readings.py), unchanged;
* ``value``: one number (or ON/OFF, true/false) per message, as ESPHome publishes;
* ``json``: an object whose numeric fields are sensors (Tasmota, Zigbee2MQTT, Shelly);
* ``influx``: InfluxDB line protocol (Telegraf, InfluxDB clients, Node-RED);
* ``csv``: ``ts,value`` rows, or a header row naming a sensor per column.
"""
