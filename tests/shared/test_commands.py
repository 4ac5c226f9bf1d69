"""Commands (shared/commands.py, docs/wire-format.md §2.11): signed by the operators'
Ed25519 key, verified by the device over the body's exact bytes; the results
(§2.12). Every decoder total under hypothesis."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import commands
from shared.commands import Command, Result, decode_result, sign, verify
from shared.errors import WireError

OPS = commands.new_private_key()
OTHER = commands.new_private_key()
KEYS = {"ops-1": OPS.public_key()}
T = 1_790_000_000 * 10**9
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def command(**kw: object) -> Command:
    base: dict[str, object] = {
        "id": "c-1", "device_id": "dev-1", "kind": "ping", "issued_ns": T,
        "expires_ns": T + 3600 * 10**9, "args": {"n": 1, "s": "é"},
    }  # fmt: skip
    return Command(**(base | kw))  # type: ignore[arg-type]


def reason(payload: bytes) -> str:
    with pytest.raises(WireError) as exc:
        verify(payload, KEYS)
    return exc.value.reason


def test_a_signed_command_verifies_and_reads_back() -> None:
    got = verify(sign(command(), "ops-1", OPS), KEYS)
    assert got == command(key="ops-1")


def test_a_forged_or_altered_command_is_refused() -> None:
    good = json.loads(sign(command(), "ops-1", OPS))
    # another key under the same name: the signature does not verify
    assert reason(sign(command(), "ops-1", OTHER)) == "bad-signature"
    # a key the device does not hold
    assert reason(sign(command(), "ops-9", OTHER)) == "unknown-key"
    # the body changed after signing (another device, a later expiry)
    for change in ({"device_id": "dev-2"}, {"expires_ns": T + 7200 * 10**9}):
        body = command(**change).body()
        forged = good | {"body": base64.b64encode(body).decode()}
        assert reason(json.dumps(forged).encode()) == "bad-signature"
    # the signature of another message of the same key
    other = json.loads(sign(command(id="c-2"), "ops-1", OPS))
    assert reason(json.dumps(good | {"sig": other["sig"]}).encode()) == "bad-signature"
    # a signature without the context prefix (a signed body of another protocol)
    raw = base64.b64encode(OPS.sign(command().body())).decode()
    assert reason(json.dumps(good | {"sig": raw}).encode()) == "bad-signature"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"id": "a b"}, "bad-command"),
        ({"kind": ""}, "bad-command"),
        ({"expires_ns": T}, "bad-command"),  # not after issued_ns
        ({"expires_ns": T + commands.MAX_LIFETIME_NS + 1}, "bad-command"),
    ],
)
def test_a_signed_but_malformed_body_is_refused(change: dict[str, object], why: str) -> None:
    assert reason(sign(command(**change), "ops-1", OPS)) == why


def test_envelope_errors() -> None:
    assert reason(b"x" * (commands.MAX_COMMAND_BYTES + 1)) == "too-large"
    assert reason(b"[]") == "bad-command"
    assert reason(b'{"v": 2}') == "bad-command"
    assert reason(b'{"v": 1, "key": "ops-1", "body": "!!", "sig": ""}') == "bad-command"
    assert reason(b'{"v": 1, "key": "ops-1", "body": "e30=", "sig": NaN}') == "bad-command"


def test_results_round_trip_and_refuse_what_is_not_one() -> None:
    r = Result(9, "c-1", "done", "", T, {"pong": T}, generation=5)
    assert decode_result(r.encode()) == r
    for bad in (b"{}", b'{"seq": 1, "id": "c", "status": "ok"}', b"\xff", b"[1]"):
        with pytest.raises(WireError) as exc:
            decode_result(bad)
        assert exc.value.reason == "bad-result"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


@FUZZ
@given(st.binary(max_size=300))
def test_verify_is_total_on_bytes(payload: bytes) -> None:
    try:
        verify(payload, KEYS)
    except WireError as exc:
        assert exc.reason in commands.REFUSALS


@FUZZ
@given(st.dictionaries(st.sampled_from(["v", "key", "body", "sig", "x"]), json_values))
def test_verify_is_total_on_envelopes(env: dict[str, object]) -> None:
    try:
        verify(json.dumps(env).encode(), KEYS)
    except WireError as exc:
        assert exc.reason in commands.REFUSALS


@FUZZ
@given(st.dictionaries(st.sampled_from(["id", "device_id", "kind", "args", "issued_ns",
                                        "expires_ns", "x"]), json_values))  # fmt: skip
def test_a_signed_body_of_anything_is_a_command_or_bad_command(body: dict[str, object]) -> None:
    raw = json.dumps(body).encode()
    env = {
        "v": 1, "key": "ops-1", "body": base64.b64encode(raw).decode(),
        "sig": base64.b64encode(OPS.sign(commands.CONTEXT + raw)).decode(),
    }  # fmt: skip
    try:
        verify(json.dumps(env).encode(), KEYS)
    except WireError as exc:
        assert exc.reason == "bad-command"


@FUZZ
@given(st.dictionaries(st.sampled_from(["seq", "id", "status", "reason", "ts_ns", "result",
                                        "generation"]), json_values))  # fmt: skip
def test_decode_result_is_total(obj: dict[str, object]) -> None:
    try:
        decode_result(json.dumps(obj).encode())
    except WireError as exc:
        assert exc.reason in ("bad-result", "too-large")
