"""Reconnect backoff for every MQTT client of the project: one rule, one place.

After a lost connection a client waits ``reconnect_min_s``, then twice as long
after each failed attempt, up to ``reconnect_max_s``, each wait with ±20 %
jitter, so that a fleet that lost its broker at the same moment does not come
back in lockstep. The cap bounds how long an outage outlasts the broker: with
the defaults (0.5 s to 5 s) a client is back within about 6 s of the broker's
return, however long the outage was. The agent's link to its device broker caps
at 1 s (edge_agent.config.IntakeBrokerConfig says why).
"""

from __future__ import annotations

import random

import paho.mqtt.client as mqtt

from shared.config import Invalid, positive

DEFAULT_MIN_S = 0.5
DEFAULT_MAX_S = 5.0
JITTER = 0.2


def check(min_s: float, max_s: float) -> None:
    """For a config's ``__post_init__``: the keys ``reconnect_min_s`` and ``reconnect_max_s``."""
    positive("reconnect_min_s", min_s)
    if max_s < min_s:
        raise Invalid("reconnect_max_s", "must be >= reconnect_min_s")
    if max_s > 3600:
        raise Invalid("reconnect_max_s", "must be at most 3600 (an hour)")


def jittered(seconds: float, rng: random.Random | None = None) -> float:
    return seconds * (rng or random).uniform(1 - JITTER, 1 + JITTER)


def next_delay(delay: float, max_s: float) -> float:
    """The wait after the next failed attempt (before jitter)."""
    return min(delay * 2, max_s)


def set_paho(client: mqtt.Client, min_s: float, max_s: float) -> None:
    """paho reconnects on its own thread, doubling from ``min_delay`` to ``max_delay``
    (paho has no jitter of its own: the jitter here is on the first wait, per client,
    and doubling keeps clients apart from then on)."""
    client.reconnect_delay_set(min_delay=jittered(min_s), max_delay=max_s)  # type: ignore[arg-type]
