"""The ingestor's MQTT client: an aiomqtt client, and the one place its internals
are touched.

aiomqtt (pinned below 3 in pyproject) has no options for what the ingestor
needs, so this module reaches into it, each time for a reason written beside it:

* **manual PUBACK**: a message is acknowledged to the broker only once it is
  written or quarantined; aiomqtt acknowledges on receipt. Its paho client's
  ``manual_ack_set`` and ``ack`` are used.
* **device acks without waiting**: aiomqtt's ``publish`` waits for the broker's
  PUBACK of each; paho's ``publish`` does not, and keeps the order.
* **a bound on device acks awaiting the broker's PUBACK.** paho queues what it
  cannot send yet without a limit, and its message ids wrap at 65,535: in a
  fuzz soak the queue grew until an id was still in use, publishing failed
  ("Message queue full") and the connection was dropped. At most
  ``MAX_ACKS_PENDING`` (16,384) wait; beyond that an ack is not sent (see :meth:`tell`).
* **TCP_NODELAY** on paho's socket.
* **Maximum Packet Size**: announced at CONNECT (``limits.max_payload_bytes`` and
  the packet's overhead), and enforced while reading, since paho would read a
  larger packet whole into memory before anyone could look at it.
* **the received-message queue**, to take every message waiting at once (a group).
* **a bound on memory, whatever the broker does.** Mosquitto 2.0.11 ignores
  Receive Maximum once PUBACKs flow, and aiomqtt queues whatever arrives: under a
  flood with a sink down the ingestor once held 24,275 messages (1.25 GB). Here,
  once ``max_held`` messages are received and not yet acknowledged (in hand or
  queued), the socket is not read any more: TCP's flow control then holds the
  broker back, and the messages wait in the broker, not in this process. Reading
  resumes when the count falls below. aiomqtt registers its own socket reader
  with the event loop; it is replaced here by :meth:`IngestClient._read`, which
  does what aiomqtt's does (read, drain TLS) packet by packet, checking the bound
  after each (paho's ``loop_read`` reads many packets at once).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt

from cloud_ingest.config import IngestConfig
from shared.acks import CONTENT_TYPE as ACK_CONTENT_TYPE
from shared.mqttprops import PACKET_OVERHEAD, connect_properties, publish_properties
from shared.tls import ssl_context

log = logging.getLogger(__name__)
#: Device acks that may await the broker's PUBACK. Far below paho's 65,535 message
#: ids; about 1 KB each. Under normal load they stay far below (the PUBACKs are read
#: whenever messages are); 4 x receive_maximum was too few: while reading pauses
#: at the bound, PUBACKs wait unread, and dropping acks then cut throughput by 4.
MAX_ACKS_PENDING = 16_384
ACK_PROPERTIES = publish_properties(ACK_CONTENT_TYPE, [])


class IngestClient:
    """``async with IngestClient(cfg) as c:`` connects; ``c.messages`` yields them."""

    def __init__(self, cfg: IngestConfig, max_held: int) -> None:
        self.max_held = max_held
        #: the Maximum Packet Size announced to the broker, and enforced in _read
        self.max_packet = cfg.limits.max_payload_bytes + PACKET_OVERHEAD
        self.max_acks_pending = MAX_ACKS_PENDING
        self.client = aiomqtt.Client(
            cfg.mqtt.host,
            cfg.mqtt.port,
            identifier=cfg.mqtt.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=connect_properties(
                cfg.mqtt.session_expiry_s,
                cfg.mqtt.receive_maximum,
                cfg.limits.max_payload_bytes + PACKET_OVERHEAD,
            ),
            keepalive=cfg.mqtt.keepalive_s,
            tls_context=ssl_context(cfg.mqtt.tls),
            username=cfg.mqtt.auth.username or None,
            password=cfg.mqtt.auth.password(),
            # one device ack per message in hand may be awaiting the broker's PUBACK;
            # paho's default of 20 queued the rest behind them
            max_inflight_messages=cfg.mqtt.receive_maximum,
        )
        # aiomqtt logs a warning per publish while more than 10 await their PUBACK:
        # thousands of lines a second under load, and a measurable cost
        self.client.pending_calls_threshold = 2 * cfg.mqtt.receive_maximum
        self._paho: mqtt.Client = self.client._client  # internal: see the module docstring
        self._queue: asyncio.Queue[aiomqtt.Message] = self.client._queue  # internal: same
        self._paho.manual_ack_set(True)
        opened, closed = self._paho.on_socket_open, self._paho.on_socket_close
        assert opened is not None and closed is not None  # aiomqtt sets both
        self._aiomqtt_socket_open: Callable[..., None] = opened
        self._aiomqtt_socket_close: Callable[..., None] = closed
        self._paho.on_socket_open = self._on_socket_open
        self._paho.on_socket_close = self._on_socket_close
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self.paused = False
        self.pauses = 0
        self.in_hand = 0  # set by the consumer: received, taken from the queue, not acked
        self.bounded = False  # see bound()

    async def __aenter__(self) -> IngestClient:
        self._loop = asyncio.get_running_loop()
        await self.client.__aenter__()
        self._no_delay()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._fd = -1
        await self.client.__aexit__(exc_type, exc, tb)

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        return self.client.messages

    async def subscribe(self, topic: str, timeout: float) -> None:
        await self.client.subscribe(topic, qos=1, timeout=timeout)

    def bound(self) -> None:
        """From now on, stop reading at ``max_held``. Call it only with a consumer
        taking messages: a SUBACK may be behind them (a persistent session's backlog
        comes first), and with nobody making room it would never be read."""
        self.bounded = True
        self._pause_if_full()

    @property
    def held(self) -> int:
        """Messages received and not yet acknowledged: queued, and in hand."""
        return self._queue.qsize() + self.in_hand

    def waiting(self) -> int:
        return self._queue.qsize()

    def take_nowait(self) -> aiomqtt.Message:
        msg = self._queue.get_nowait()
        self.in_hand += 1
        return msg

    def taken(self, n: int = 1) -> None:
        """``n`` messages came in through :attr:`messages` (not :meth:`take_nowait`)."""
        self.in_hand += n

    def ack(self, msg: aiomqtt.Message) -> None:
        """PUBACK: the broker may forget the message now."""
        self._paho.ack(msg.mid, msg.qos)
        self.in_hand -= 1
        self._resume_if_room()

    def forget(self, n: int) -> None:
        """``n`` messages in hand are given up without a PUBACK (abandoned at shutdown)."""
        self.in_hand -= n
        self._resume_if_room()

    @property
    def acks_pending(self) -> int:
        """Device acks published and not yet acknowledged by the broker, in flight
        or queued in paho."""
        return len(self._paho._out_messages)  # internal: see the module docstring

    def tell(self, topic: str, payload: bytes) -> bool:
        """Publish a device ack at QoS 1 without waiting for the broker's PUBACK;
        False if not sent because ``max_acks_pending`` acks await theirs already.

        An ack not sent costs nothing but time: the device resends the batch after
        its ack timeout, and the resend is answered as a duplicate.

        It goes out after the PUBACK of the batch it answers (same connection, in
        order). Waiting for the broker's PUBACK of every ack (aiomqtt's ``publish``)
        put a network round trip between one group's writes and the next's. If the
        connection drops first, the ack may be lost: the device resends the batch,
        which is then recognised as written (or written again, the same version)
        and acked again."""
        if self.acks_pending >= self.max_acks_pending:
            return False
        info = self._paho.publish(topic, payload, qos=1, properties=ACK_PROPERTIES)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttError(f"could not publish an ack: {mqtt.error_string(info.rc)}")
        return True

    def _no_delay(self) -> None:
        """Send small packets (PUBACKs, acks) at once: with Nagle's algorithm on, they
        waited for the broker's delayed TCP ACK, ~40 ms each on Linux."""
        sock = self._paho.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ---- the read gate ------------------------------------------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """paho calls this (from the thread that connects) with a new socket: let
        aiomqtt register its reader, then put ours in its place, on the loop."""
        self._aiomqtt_socket_open(client, userdata, sock)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._take_over_reading, sock.fileno())

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._aiomqtt_socket_close(client, userdata, sock)  # removes the reader
        self._fd, self.paused = -1, False

    def _take_over_reading(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_reader(fd)  # aiomqtt's reader, added just before this
        self._fd, self.paused = fd, False
        self._loop.add_reader(fd, self._read)

    def _read(self) -> None:
        """What aiomqtt's reader does (read, drain TLS), packet by packet, stopping
        at the bound. paho's ``loop_read`` reads as many packets as it has messages
        in flight, acks included, whatever its argument says: with 1,024 acks
        awaiting their PUBACK it took 1,250 messages where the bound was 256."""
        paho = self._paho
        try:
            while not self._full():
                if paho._sock is None:  # internal: closed by the packet before
                    return
                rc = paho._packet_read()  # internal: one packet
                self._refuse_oversized()
                if rc == mqtt.MQTT_ERR_AGAIN:
                    pending = getattr(paho._sock, "pending", None)  # internal: TLS
                    if pending is not None and pending() > 0:
                        continue  # decoded TLS bytes that the socket no longer signals
                    return
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    paho._loop_rc_handle(rc)  # internal: what loop_read does on an error
                    return
        except Exception as exc:  # noqa: BLE001 (aiomqtt's own rule: a broken connection)
            disconnected = self.client._disconnected  # internal: how aiomqtt is told
            if not disconnected.done():
                disconnected.set_exception(exc)
            return
        self._pause_if_full()

    def _refuse_oversized(self) -> None:
        """A broker must not send a packet over the Maximum Packet Size this client
        announced (MQTT 5.0 §3.1.2.11.4), but paho would read one whole into memory
        (a 64 MiB message took the ingestor from 106 to 626 MB). Once a packet's
        length is known, a larger one ends the connection before it is read."""
        packet = self._paho._in_packet  # internal: the packet being read
        size = packet["remaining_length"] if packet["have_remaining"] else 0
        if size > self.max_packet:
            raise aiomqtt.MqttError(
                f"the broker sent a packet of {size} bytes, over the Maximum Packet Size "
                f"{self.max_packet} this client announced (limits.max_payload_bytes); set "
                "the broker's max_packet_size to refuse such messages at its door"
            )

    def _full(self) -> bool:
        return self.bounded and self.held >= self.max_held

    def _pause_if_full(self) -> None:
        if self._full() and not self.paused and self._fd >= 0:
            assert self._loop is not None
            self._loop.remove_reader(self._fd)
            self.paused = True
            self.pauses += 1

    def _resume_if_room(self) -> None:
        if self.paused and self.held < self.max_held and self._fd >= 0 and self._loop:
            self.paused = False
            self._loop.add_reader(self._fd, self._read)
