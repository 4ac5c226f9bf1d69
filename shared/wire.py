"""Wire formats v1 and v2: one batch of closed windows per MQTT message.

The normative description is ``docs/wire-format.md``; this module is the
reference encoder and decoder. A :class:`Batch` is checked when it is built, so
an invalid batch can neither be sent nor come out of :func:`decode_batch`.

Layout::

    preamble  10 bytes  magic "TLMB", u8 format version (1), u8 codec (0 none, 1 zstd),
                        u32 LE length of the uncompressed body
    body      (compressed with the codec)
              u32 LE header length, header (UTF-8 JSON), column bytes in header order

Version 2 (docs/wire-format.md §2.14) is v1 without the ``mean`` column (it is
``sum / count``) and with the sketches as varints under one α: about a third
fewer bytes a month for a device that sends a batch per window close. It
travels on its own topic prefix (§2.6); :func:`encode_batch` makes it on request
and falls back to v1 for a batch v2 cannot carry exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import zstandard

from shared import jsonwire
from shared import tags as tags_mod
from shared.errors import WireError
from shared.sketch import sketches_to_varints, varints_to_sketches
from shared.topics import is_valid_id, is_valid_unit

MAGIC: Final = b"TLMB"
FORMAT_VERSION: Final = 1
#: the versions this module encodes and decodes
VERSIONS: Final = (1, 2)
CODEC_NONE: Final = 0
CODEC_ZSTD: Final = 1
CONTENT_TYPE: Final = "application/vnd.telemetry.batch.v1"
CONTENT_TYPE_V2: Final = "application/vnd.telemetry.batch.v2"
_PREAMBLE = struct.Struct("<4sBBI")
_U32 = struct.Struct("<I")

#: Default limits for decoding untrusted input.
MAX_PAYLOAD_BYTES: Final = 1 << 20
MAX_BODY_BYTES: Final = 16 << 20

STAT_FIELDS: Final = ("min", "max", "mean", "stddev", "first", "last")
#: Added within v1 (a decoder fills them with NaN when a batch lacks them).
EXTRA_FIELDS: Final = ("sum", "p50", "p90", "p99")

# name -> (numpy dtype, encoding); the order is the order an encoder writes.
COLUMNS: Final[Mapping[str, tuple[str, str]]] = {
    "sensor": ("uint16", "plain"),
    "start_ns": ("int64", "delta"),
    "count": ("uint32", "plain"),
    "invalid": ("uint32", "plain"),
    **{name: ("float64", "plain") for name in STAT_FIELDS},
    **{name: ("float64", "plain") for name in EXTRA_FIELDS},
    "revision": ("uint32", "plain"),
}
#: Columns added within v1, with the value a decoder assumes when a batch lacks them.
OPTIONAL_COLUMNS: Final[Mapping[str, float]] = {
    **{name: float("nan") for name in EXTRA_FIELDS},
    "revision": 0,
}
WINDOW_KINDS: Final = ("tumbling", "hopping")


def _int64(value: object) -> bool:
    """An int (not a bool) that fits a signed 64-bit integer."""
    return type(value) is int and -(2**63) <= value < 2**63


@dataclass(frozen=True)
class SensorRef:
    """A sensor as the device knows it: the node it is wired to, its name, its unit,
    and static tags from the agent's config (shared/tags.py), as sorted pairs."""

    node: str
    name: str
    unit: str = ""
    tags: tags_mod.Tags = ()

    def __post_init__(self) -> None:
        if self.tags:
            why = tags_mod.check(self.tags)
            if why is not None:
                raise WireError("bad-sensor", why)
        for key in ("node", "name"):
            if not is_valid_id(getattr(self, key)):
                raise WireError(
                    "bad-sensor", f"sensor {key} {getattr(self, key)!r} is not a valid id"
                )
        if not is_valid_unit(self.unit):
            raise WireError(
                "bad-sensor",
                f"unit {self.unit[:40]!r} is longer than 32 characters or has a control one",
            )


@dataclass(frozen=True)
class WindowSpec:
    """``tumbling``: windows ``[k·width, (k+1)·width)``. ``hopping``: windows
    ``[k·hop, k·hop + width)``, overlapping, with ``width`` a multiple of ``hop``."""

    kind: str
    width_ns: int
    hop_ns: int = 0  # hopping only

    def __post_init__(self) -> None:
        if self.kind not in WINDOW_KINDS:
            raise WireError("bad-window", f"window kind {self.kind!r} is not one of {WINDOW_KINDS}")
        if not _int64(self.width_ns) or self.width_ns <= 0:
            raise WireError(
                "bad-window",
                f"window width_ns must be a positive 64-bit integer, got {self.width_ns!r}",
            )
        if self.kind == "hopping" and (
            not _int64(self.hop_ns) or self.hop_ns <= 0 or self.width_ns % self.hop_ns
        ):
            raise WireError("bad-window", "hop_ns must be a positive divisor of width_ns")
        if self.kind == "tumbling" and self.hop_ns not in (0, self.width_ns):
            raise WireError("bad-window", "a tumbling window has no hop_ns")

    @property
    def step_ns(self) -> int:
        """Distance between window starts."""
        return self.hop_ns if self.kind == "hopping" else self.width_ns


@dataclass(frozen=True, eq=False)
class Batch:
    """Closed windows of one device, identified by (device_id, seq).

    Row i is the window ``[start_ns[i], start_ns[i] + width_ns)`` of sensor
    ``sensors[sensor[i]]``; ``revision`` is 0 for its first version and grows each
    time late readings make the device send the window again. ``count`` counts
    finite readings, ``invalid`` the NaN and infinite ones (excluded from every
    statistic). When ``count`` is 0 the float statistics are NaN. ``stddev`` is the
    population standard deviation (ddof=0).
    """

    device_id: str
    seq: int
    created_ns: int
    window: WindowSpec
    sensors: tuple[SensorRef, ...]
    sensor: npt.NDArray[np.uint16]
    start_ns: npt.NDArray[np.int64]
    count: npt.NDArray[np.uint32]
    invalid: npt.NDArray[np.uint32]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    mean: npt.NDArray[np.float64]
    stddev: npt.NDArray[np.float64]
    first: npt.NDArray[np.float64]
    last: npt.NDArray[np.float64]
    sum: npt.NDArray[np.float64]
    p50: npt.NDArray[np.float64]
    p90: npt.NDArray[np.float64]
    p99: npt.NDArray[np.float64]
    revision: npt.NDArray[np.uint32]
    #: One encoded DDSketch (shared/sketch.py) per row, or () when the encoder sent none.
    sketch: tuple[bytes, ...] = ()
    #: The device's buffer generation (docs/wire-format.md §2.3): a random number
    #: drawn when the agent's buffer was created, so that the seqs of a re-created
    #: buffer (which start at 1 again) are never taken for the old one's. 0 = none.
    generation: int = 0

    def __post_init__(self) -> None:
        if not is_valid_id(self.device_id):
            raise WireError("bad-device-id", f"device_id {self.device_id!r} is not a valid id")
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or not 0 <= self.seq < 2**63:
            raise WireError("bad-seq", f"seq must be an integer in [0, 2^63), got {self.seq!r}")
        if not _int64(self.created_ns) or self.created_ns < 0:
            raise WireError("bad-header", "created_ns must be an integer in [0, 2^63)")
        if not _int64(self.generation) or self.generation < 0:
            raise WireError("bad-header", "generation must be an integer in [0, 2^63)")
        n = len(self.sensor)
        for name, (dtype, _) in COLUMNS.items():
            col = getattr(self, name)
            if not isinstance(col, np.ndarray) or col.ndim != 1 or col.dtype != np.dtype(dtype):
                raise WireError("bad-column", f"column {name} must be a 1-d {dtype} array")
            if len(col) != n:
                raise WireError("bad-column", f"column {name} has {len(col)} rows, expected {n}")
        if self.sketch and len(self.sketch) != n:
            raise WireError("bad-column", f"{len(self.sketch)} sketches for {n} rows")
        if n and int(self.sensor.max()) >= len(self.sensors):
            raise WireError("bad-column", "sensor index out of range of the sensors list")
        if n and np.any(self.start_ns % self.window.step_ns):
            raise WireError("bad-column", "start_ns not aligned to the window width (or hop)")
        if np.any((self.count == 0) & (self.invalid == 0)):
            raise WireError("bad-column", "a window with no readings at all")

    @property
    def rows(self) -> int:
        return len(self.sensor)

    @property
    def readings(self) -> int:
        """Readings summarised in this batch (finite + invalid)."""
        return int(self.count.sum(dtype=np.int64) + self.invalid.sum(dtype=np.int64))


def make_batch(
    *,
    device_id: str,
    seq: int,
    created_ns: int,
    window: WindowSpec,
    sensors: tuple[SensorRef, ...],
    columns: Mapping[str, npt.ArrayLike],
    sketch: tuple[bytes, ...] = (),
    generation: int = 0,
) -> Batch:
    """Build a batch from loosely typed columns (converted to the wire dtypes);
    optional columns that are absent are filled with NaN, but ``sum`` with
    count × mean."""
    n = len(columns["sensor"])  # type: ignore[arg-type]
    given = columns
    columns = {**{k: np.full(n, v) for k, v in OPTIONAL_COLUMNS.items()}, **columns}
    if "sum" not in given:  # as a decoder does for a batch without the column
        with np.errstate(over="ignore", invalid="ignore"):
            columns["sum"] = np.asarray(given["mean"], dtype=np.float64) * np.asarray(
                given["count"], dtype=np.float64
            )
    cols = {
        name: np.ascontiguousarray(columns[name], dtype=dt) for name, (dt, _) in COLUMNS.items()
    }
    return Batch(
        device_id=device_id,
        seq=seq,
        created_ns=created_ns,
        window=window,
        sensors=sensors,
        sketch=sketch,
        generation=generation,
        **cols,
    )


def take_rows(batch: Batch, rows: npt.NDArray[np.bool_]) -> Batch:
    """The batch with only the rows where ``rows`` is true (same seq, sensors list
    and generation): what a receiver keeps of a batch it takes in part."""
    return dataclasses.replace(
        batch,
        **{name: getattr(batch, name)[rows] for name in COLUMNS},
        sketch=tuple(s for s, k in zip(batch.sketch, rows.tolist(), strict=True) if k)
        if batch.sketch
        else (),
    )


def encode_batch(
    batch: Batch, *, compress: bool = True, level: int = 3, version: int = FORMAT_VERSION
) -> bytes:
    """Serialise ``batch`` to wire format v1, or v2 (``version=2``) where it carries
    the batch exactly: every ``mean`` is ``sum / count`` (as the agent's kernels
    compute it) and the sketches share one α. Otherwise v1: a payload's version
    byte says which it is (the agent picks the topic by it)."""
    extra: dict[str, Any] = {}
    sketch_column: tuple[str, bytes] | None = None
    if version == 2:
        v2 = _v2_parts(batch)
        if v2 is None:
            version = 1
        else:
            extra, sketch_column = v2
    elif version != 1:
        raise ValueError(f"wire format version {version}: this encoder writes {VERSIONS}")
    blobs: list[bytes] = []
    col_meta: list[dict[str, Any]] = []
    for name, (dtype, encoding) in COLUMNS.items():
        if version == 2 and name == "mean":
            continue
        col = getattr(batch, name)
        if encoding == "delta":
            col = np.diff(col, prepend=np.int64(0)) if len(col) else col
        data = np.ascontiguousarray(col, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
        blobs.append(data)
        col_meta.append({"name": name, "type": dtype, "encoding": encoding, "bytes": len(data)})
    if sketch_column is not None:
        blobs.append(sketch_column[1])
        col_meta.append(
            {
                "name": "sketch",
                "type": "bytes",
                "encoding": "varint",
                "bytes": len(sketch_column[1]),
            }
        )
    elif batch.sketch:
        data = _encode_blobs(batch.sketch)
        blobs.append(data)
        col_meta.append(
            {"name": "sketch", "type": "bytes", "encoding": "offsets", "bytes": len(data)}
        )
    header = {
        "device_id": batch.device_id,
        "seq": batch.seq,
        "created_ns": batch.created_ns,
        "window": {"kind": batch.window.kind, "width_ns": batch.window.width_ns}
        | ({"hop_ns": batch.window.hop_ns} if batch.window.kind == "hopping" else {}),
        "sensors": [_sensor_obj(s) for s in batch.sensors],
        "rows": batch.rows,
        "columns": col_meta,
    }
    if batch.generation:
        header["generation"] = batch.generation
    header |= extra
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    body = _U32.pack(len(hbytes)) + hbytes + b"".join(blobs)
    return frame(MAGIC, version, body, compress=compress, level=level)


def _mean_of(sum_: npt.NDArray[np.float64], count: npt.NDArray[np.uint32]) -> Any:
    """``sum / count`` as the kernels compute a window's mean (NaN without readings)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return sum_ / count


def _v2_parts(batch: Batch) -> tuple[dict[str, Any], tuple[str, bytes] | None] | None:
    """v2's header keys and sketch column for ``batch``, or None if v2 cannot carry
    it exactly (a mean that is not sum / count, sketches of different α)."""
    derived = _mean_of(batch.sum, batch.count)
    same = (derived == batch.mean) | (np.isnan(derived) & np.isnan(batch.mean))
    if not same.all():
        return None
    if not batch.sketch:
        return {}, None
    packed = sketches_to_varints(batch.sketch)
    if packed is None:
        return None
    alpha, data = packed
    return {"sketch_alpha": alpha}, ("sketch", data)


def frame(
    magic: bytes, version: int, body: bytes, *, compress: bool = True, level: int = 3
) -> bytes:
    """The preamble (§2.2) and ``body``, zstd-compressed unless ``compress`` is False.
    Batches use it, and the raw readings of §2.13 with their own magic."""
    if compress:
        return _PREAMBLE.pack(magic, version, CODEC_ZSTD, len(body)) + (
            # the frame's content checksum (XXH64, 4 bytes): damage on the device's SD
            # card or on the way fails the decode (bad-compression) instead of passing
            zstandard.ZstdCompressor(level=level, write_checksum=True).compress(body)
        )
    return _PREAMBLE.pack(magic, version, CODEC_NONE, len(body)) + body


def decode_batch(
    payload: bytes,
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
    versions: Sequence[int] = (FORMAT_VERSION,),
) -> Batch:
    """Parse and validate untrusted bytes of one of ``versions``; raise
    :class:`WireError` with a reason. v1 only unless asked: a receiver takes v2 on
    v2's topic (docs/wire-format.md §2.6)."""
    body = unframe(
        payload,
        MAGIC,
        versions,
        max_payload_bytes=max_payload_bytes,
        max_body_bytes=max_body_bytes,
    )
    return _decode_body(body, payload[4])


def unframe(
    payload: bytes,
    magic_expected: bytes,
    version_expected: int | Sequence[int],
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> bytes:
    """The body of a payload made by :func:`frame`, checked in the order of §2.5 step 2;
    raises :class:`WireError` with its reason."""
    if len(payload) > max_payload_bytes:
        raise WireError("too-large", f"payload is {len(payload)} bytes, limit {max_payload_bytes}")
    if len(payload) < _PREAMBLE.size:
        raise WireError("truncated", "payload shorter than the 10-byte preamble")
    magic, version, codec, body_len = _PREAMBLE.unpack_from(payload)
    if magic != magic_expected:
        raise WireError("bad-magic", f"expected magic {magic_expected!r}, got {magic!r}")
    known = (version_expected,) if isinstance(version_expected, int) else version_expected
    if version not in known:
        raise WireError(
            "unsupported-version",
            f"format version {version}, this decoder reads " + " and ".join(str(v) for v in known),
        )
    if body_len > max_body_bytes:
        raise WireError("too-large", f"declared body of {body_len} bytes, limit {max_body_bytes}")
    raw = payload[_PREAMBLE.size :]
    if codec == CODEC_ZSTD:
        body = _inflate(raw, body_len)
    elif codec == CODEC_NONE:
        body = raw
    else:
        raise WireError("unsupported-codec", f"codec {codec} is not 0 (none) or 1 (zstd)")
    if len(body) != body_len:
        raise WireError("truncated", f"body is {len(body)} bytes, preamble says {body_len}")
    return body


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """One per thread (they are not thread-safe), reused: creating one per batch
    showed in profiles of the ingestor."""
    d: zstandard.ZstdDecompressor | None = getattr(_local, "zstd", None)
    if d is None:
        d = _local.zstd = zstandard.ZstdDecompressor()
    return d


def _inflate(raw: bytes, body_len: int) -> bytes:
    """Decompress at most ``body_len + 1`` bytes, whatever the frame claims.

    ``ZstdDecompressor.decompress`` trusts the frame's own content size and would
    allocate it, so a small frame claiming gigabytes could exhaust memory; a
    bounded streaming read cannot.
    """
    out = bytearray()
    try:
        with _decompressor().stream_reader(raw) as reader:
            while len(out) <= body_len:
                chunk = reader.read(body_len + 1 - len(out))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise WireError("bad-compression", f"zstd: {exc}") from None
    if len(out) > body_len:
        raise WireError("too-large", f"body inflates beyond the declared {body_len} bytes")
    return bytes(out)


def peek_seq(payload: bytes, *, max_body_bytes: int = MAX_BODY_BYTES) -> int | None:
    """Best effort: the ``seq`` in the header of a payload that failed to decode,
    so that the sender can be told it was rejected. None if it cannot be read."""
    return peek_ids(payload, max_body_bytes=max_body_bytes)[0]


def peek_ids(payload: bytes, *, max_body_bytes: int = MAX_BODY_BYTES) -> tuple[int | None, int]:
    """Best effort: (``seq``, ``generation``) from the header of a payload that failed
    to decode; seq None if it cannot be read, generation 0 if absent or unreadable."""
    try:
        magic, version, codec, body_len = _PREAMBLE.unpack_from(payload)
        if magic != MAGIC or version not in VERSIONS or body_len > max_body_bytes:
            return None, 0
        raw = payload[_PREAMBLE.size :]
        body = _inflate(raw, body_len) if codec == CODEC_ZSTD else raw
        (hlen,) = _U32.unpack_from(body)
        obj = header_json(body[_U32.size : _U32.size + hlen])
        seq, gen = obj["seq"], obj.get("generation", 0)
    except (struct.error, WireError, KeyError, TypeError, AttributeError):
        return None, 0
    gen = gen if type(gen) is int and 0 <= gen < 2**63 else 0
    return (seq if type(seq) is int and 0 <= seq < 2**63 else None), gen


def _encode_blobs(blobs: tuple[bytes, ...]) -> bytes:
    """``bytes``/``offsets``: rows + 1 u32 offsets into the data that follows them."""
    offsets = np.zeros(len(blobs) + 1, dtype="<u4")
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return offsets.tobytes() + b"".join(blobs)


def _decode_blobs(chunk: bytes, rows: int) -> tuple[bytes, ...]:
    head = 4 * (rows + 1)
    if len(chunk) < head:
        raise WireError("bad-column", "sketch offsets run past the column")
    offsets = np.frombuffer(chunk, dtype="<u4", count=rows + 1).astype(np.int64)
    data = chunk[head:]
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != len(data):
        raise WireError("bad-column", "sketch offsets do not match the column")
    return tuple(data[offsets[i] : offsets[i + 1]] for i in range(rows))


def header_json(raw: bytes) -> Any:
    """The header's JSON: UTF-8 only (json.loads would also take UTF-16 and -32, and a
    byte-order mark) and JSON only (not ``NaN``): docs/wire-format.md §2.5."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("bad-header", f"header is not UTF-8: {exc}"[:200]) from None
    return jsonwire.loads(text, reason="bad-header", what="header", max_bytes=len(raw), strict=True)


def body_header(body: bytes) -> tuple[dict[str, Any], int]:
    """A body's header (§2.5 step 3: its length field, UTF-8 JSON, an object) and the
    offset of the columns after it."""
    if len(body) < _U32.size:
        raise WireError("truncated", "body shorter than its header length field")
    (hlen,) = _U32.unpack_from(body)
    if _U32.size + hlen > len(body):
        raise WireError("truncated", "header runs past the end of the body")
    header = header_json(body[_U32.size : _U32.size + hlen])
    if not isinstance(header, dict):
        raise WireError("bad-header", "header is not a JSON object")
    return header, _U32.size + hlen


def _decode_body(body: bytes, version: int = FORMAT_VERSION) -> Batch:
    header, offset = body_header(body)
    rows = _field(header, "rows", int)
    if rows < 0:
        raise WireError("bad-header", "rows is negative")
    window = _field(header, "window", dict)
    sensors_raw = _field(header, "sensors", list)
    if not all(isinstance(s, dict) for s in sensors_raw):
        raise WireError("bad-header", "sensors must be a list of objects")
    if len(sensors_raw) > 65536:
        raise WireError("bad-header", "more than 65536 sensors")
    sensors = tuple(
        _sensor_ref(
            _field(s, "node", str), _field(s, "name", str),
            _field(s, "unit", str) if "unit" in s else "", _tags(s.get("tags")),
        )
        for s in sensors_raw
    )  # fmt: skip
    kind = _field(window, "kind", str)
    spec = WindowSpec(
        kind=kind,
        width_ns=_field(window, "width_ns", int),
        hop_ns=_field(window, "hop_ns", int) if kind == "hopping" else 0,
    )
    found: dict[str, npt.NDArray[Any]] = {}
    sketches: tuple[bytes, ...] = ()
    for meta in _field(header, "columns", list):
        if not isinstance(meta, dict):
            raise WireError("bad-header", "columns must be a list of objects")
        name = _field(meta, "name", str)
        nbytes = _field(meta, "bytes", int)
        if nbytes < 0 or offset + nbytes > len(body):
            raise WireError("truncated", f"column {name} runs past the end of the body")
        chunk = body[offset : offset + nbytes]
        offset += nbytes
        if name == "sketch":
            if version == 2:
                if meta.get("type") != "bytes" or meta.get("encoding") != "varint":
                    raise WireError("bad-column", "column sketch must be bytes/varint in v2")
                alpha = header.get("sketch_alpha")
                if type(alpha) is not float:
                    raise WireError("bad-header", "a v2 sketch column needs sketch_alpha")
                sketches = varints_to_sketches(chunk, rows, alpha)
                continue
            if meta.get("type") != "bytes" or meta.get("encoding") != "offsets":
                raise WireError("bad-column", "column sketch must be bytes/offsets")
            sketches = _decode_blobs(chunk, rows)
            continue
        if version == 2 and name == "mean":
            raise WireError("bad-column", "v2 has no mean column (it is sum / count)")
        if name not in COLUMNS:
            continue  # unknown columns are skipped: minor additions stay compatible
        dtype, encoding = COLUMNS[name]
        if meta.get("type") != dtype or meta.get("encoding") != encoding:
            raise WireError("bad-column", f"column {name} must be {dtype}/{encoding}")
        if nbytes != rows * np.dtype(dtype).itemsize:
            raise WireError("bad-column", f"column {name} has {nbytes} bytes for {rows} rows")
        col = np.frombuffer(chunk, dtype=_LITTLE[dtype]).astype(dtype)
        if encoding == "delta":
            col = np.cumsum(col, dtype=np.int64)
        found[name] = col
    if offset != len(body):
        raise WireError("bad-header", f"{len(body) - offset} bytes after the last column")
    if version == 2 and "sum" not in found:  # the sum is required, the mean derived
        raise WireError("bad-column", "missing required column sum")
    derived = ("mean",) if version == 2 else ()
    missing = [
        name
        for name in COLUMNS
        if name not in found and name not in OPTIONAL_COLUMNS and name not in derived
    ]
    if missing:
        raise WireError("bad-column", f"missing required columns {missing}")
    if version == 2:
        found["mean"] = _mean_of(found["sum"], found["count"]).astype(np.float64)
    for name, default in OPTIONAL_COLUMNS.items():
        if name not in found:
            found[name] = np.full(rows, default).astype(COLUMNS[name][0])
    if "sum" not in {m.get("name") for m in header["columns"]}:
        # a batch from before the sum column: its sum is count x mean (NaN when empty)
        with np.errstate(over="ignore", invalid="ignore"):
            found["sum"] = found["mean"] * found["count"]
    generation = header.get("generation", 0)
    if type(generation) is not int:
        raise WireError("bad-header", "header field 'generation' must be int")
    return Batch(
        device_id=_field(header, "device_id", str),
        seq=_field(header, "seq", int),
        created_ns=_field(header, "created_ns", int),
        window=spec,
        sensors=sensors,
        **found,
        sketch=sketches,
        generation=generation,
    )


def _sensor_obj(s: SensorRef) -> dict[str, Any]:
    """A sensor in the header: ``tags`` only when it has some (added within v1)."""
    obj: dict[str, Any] = {"node": s.node, "name": s.name, "unit": s.unit}
    if s.tags:
        obj["tags"] = dict(s.tags)
    return obj


def _tags(raw: object) -> tags_mod.Tags:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise WireError("bad-header", "a sensor's tags must be an object of strings")
    tags = tuple(sorted(raw.items()))
    why = tags_mod.check(tags)
    if why is not None:
        raise WireError("bad-header", why)
    return tags


@functools.lru_cache(maxsize=65536)
def _sensor_ref(node: str, name: str, unit: str, tags: tags_mod.Tags = ()) -> SensorRef:
    """Validated once per distinct sensor: a fleet sends the same ones in every
    batch, and their validation was a tenth of the decode."""
    return SensorRef(node, name, unit, tags)


#: the wire's little-endian dtype of each column type (built once: it showed in profiles)
_LITTLE: Final = {dt: np.dtype(dt).newbyteorder("<") for dt, _ in COLUMNS.values()}


def _field(obj: dict[str, Any], key: str, tp: type) -> Any:
    value = obj.get(key)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise WireError("bad-header", f"header field {key!r} must be {tp.__name__}")
    return value


def check_ranges(batch: Batch) -> None:
    """The receiver's plausibility check of a decoded batch (docs/cloud-ingest.md,
    "NaN/Inf policy"): raises :class:`WireError` ``bad-range``.

    A window with finite readings (``count`` > 0) has finite min, max, mean,
    stddev, first, last and sum, with min ≤ mean, first, last ≤ max and stddev ≥ 0;
    the quantiles are finite or NaN (absent), within [min, max] and in order. A
    window without (``count`` = 0) has only NaN. No statistic is infinite. (How far
    from the receiver's clock a window may start is the receiver's policy:
    cloud_ingest/ingest/quotas.py.)
    """
    if batch.rows == 0:
        return
    _check_columns(batch.count, {name: getattr(batch, name) for name in STAT_FIELDS + EXTRA_FIELDS})


def check_ranges_many(batches: Sequence[Batch]) -> list[WireError | None]:
    """:func:`check_ranges` of each batch: one check of all their rows at once, and
    only if that fails, batch by batch to find the ones at fault."""
    live = [b for b in batches if b.rows]
    if live:
        try:
            _check_columns(
                np.concatenate([b.count for b in live]),
                {
                    name: np.concatenate([getattr(b, name) for b in live])
                    for name in STAT_FIELDS + EXTRA_FIELDS
                },
            )
        except WireError:
            pass
        else:
            return [None] * len(batches)
    out: list[WireError | None] = []
    for b in batches:
        try:
            check_ranges(b)
            out.append(None)
        except WireError as exc:
            out.append(exc)
    return out


def _check_columns(count: npt.NDArray[Any], cols: Mapping[str, npt.NDArray[np.float64]]) -> None:
    core = np.stack([cols[name] for name in (*STAT_FIELDS, "sum")])
    extra = np.stack([cols[name] for name in EXTRA_FIELDS if name != "sum"])
    if np.isinf(core).any() or np.isinf(extra).any():
        raise WireError("bad-range", "a statistic is infinite")
    has = count > 0
    if not np.isfinite(core[:, has]).all():
        raise WireError("bad-range", "a window with readings has a NaN statistic")
    if not (np.isnan(core[:, ~has]).all() and np.isnan(extra[:, ~has]).all()):
        raise WireError("bad-range", "a window without finite readings has statistics")
    lo, hi = cols["min"][has], cols["max"][has]
    eps = 1e-9 * (np.abs(lo) + np.abs(hi)) + 1e-300  # rounding of a mean of equal values
    with np.errstate(invalid="ignore"):  # NaN compares false: absent quantiles pass
        for name in ("mean", "first", "last", "p50", "p90", "p99"):
            v = cols[name][has]
            if np.any((v < lo - eps) | (v > hi + eps)):
                raise WireError("bad-range", f"{name} outside [min, max]")
        if np.any(cols["stddev"][has] < 0):
            raise WireError("bad-range", "a negative stddev")
        p50, p90, p99 = cols["p50"][has], cols["p90"][has], cols["p99"][has]
        if np.any((p50 > p90 + eps) | (p90 > p99 + eps)):
            raise WireError("bad-range", "quantiles out of order")
