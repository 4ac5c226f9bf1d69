"""Stand-ins behind the injectable interfaces, for benchmarks and tests without a broker."""

from __future__ import annotations

from typing import Any


class StubPahoClient:
    """The part of paho's client that ``edge_agent.pipeline.intake.Intake`` uses
    (``Intake(cfg, client=...)``), doing nothing: acknowledgements go nowhere."""

    on_connect: Any = None
    on_disconnect: Any = None
    on_message: Any = None
    on_subscribe: Any = None

    def ack(self, mid: int, qos: int) -> None:
        pass
