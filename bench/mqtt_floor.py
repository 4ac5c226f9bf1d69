"""The MQTT floor of an ingestor: receive each batch, ack it to its device, PUBACK it.

No decoding beyond the seq, no InfluxDB, no lake. This is the least work any
ingestor written on paho-mqtt has to do per batch, so its rate on a machine is
an upper bound for ``cloud-ingest`` on the same machine. ``bench/ingest.py``
runs it as a subprocess:

    python bench/mqtt_floor.py --port 1883 --ready-file /tmp/ready [--receive-maximum 256]
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared.acks import Ack
from shared.mqttprops import connect_properties
from shared.topics import ack_topic, batch_filter, device_from_batch_topic
from shared.wire import peek_seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--receive-maximum", type=int, default=256)
    args = ap.parse_args()

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-mqtt-floor",
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    client.max_inflight_messages_set(args.receive_maximum)
    subscribed = threading.Event()

    def on_connect(c: mqtt.Client, *_a: object) -> None:
        c.subscribe(batch_filter(), qos=1)

    def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        device = device_from_batch_topic(msg.topic)
        seq = peek_seq(msg.payload)
        if device is not None and seq is not None:
            c.publish(ack_topic(device), Ack(seq, "stored").encode(), qos=1)
        c.ack(msg.mid, msg.qos)

    client.on_connect = on_connect
    client.on_message = on_message
    client.on_subscribe = lambda *_a, **_k: subscribed.set()
    client.connect("127.0.0.1", args.port, properties=connect_properties(60, args.receive_maximum))
    client.loop_start()
    if not subscribed.wait(30):
        raise SystemExit("mqtt floor: not subscribed within 30 s")
    Path(args.ready_file).write_text("ready\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_a: stop.set())
    stop.wait()
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
