"""Static tags: the agent's config, the batch header, InfluxDB's series and the lake."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import pytest

from cloud_ingest.config import InfluxConfig
from cloud_ingest.lake import read_table, table_to_batches
from cloud_ingest.sinks.lineproto import batch_to_lines
from devstack.hostile import split, with_header
from edge_agent.config import AgentConfig, sensor_tags
from shared import tags
from shared.config import Invalid, from_dict
from shared.errors import ConfigError, WireError
from shared.wire import SensorRef, WindowSpec, decode_batch, encode_batch, make_batch
from tests.helpers import batch_objects

T0 = 1_732_600_000 * 10**9


def batch(refs: tuple[SensorRef, ...]) -> Any:
    n = len(refs)
    return make_batch(
        device_id="dev-1",
        seq=3,
        created_ns=T0,
        window=WindowSpec("tumbling", 10**10),
        sensors=refs,
        columns={
            "sensor": list(range(n)),
            "start_ns": [T0] * n,
            "count": [1] * n,
            "invalid": [0] * n,
            **{k: [1.0] * n for k in ("sum", "min", "max", "mean", "stddev", "first", "last",
                                      "p50", "p90", "p99")},
        },
    )  # fmt: skip


REFS = (
    SensorRef("kitchen", "temp", "degC", (("building", "b1"), ("site", "berlin"))),
    SensorRef("hall", "temp", "degC", (("secret", "x y".replace(" ", "_")), ("site", "berlin"))),
    SensorRef("cellar", "temp"),
)


def test_tags_travel_in_the_header_and_old_headers_decode() -> None:
    b = batch(REFS)
    back = decode_batch(encode_batch(b))
    assert back.sensors == REFS
    # a sensor without tags is written as before: no "tags" key at all
    raw = encode_batch(dataclasses.replace(b, sensors=(REFS[2],) * 3), compress=False)
    assert b'"tags"' not in raw


@pytest.mark.parametrize(
    "bad",
    [
        {"Site": "x"},
        {"node": "x"},
        {"site": "a b"},
        {"site": 5},
        {f"k{i}": "v" for i in range(9)},
        ["site", "x"],
    ],
)
def test_bad_tags_are_refused_with_bad_header(bad: Any) -> None:
    header, columns = split(encode_batch(batch((REFS[2],)), compress=False))
    assert decode_batch(with_header(header, columns)).sensors == (REFS[2],)
    header["sensors"][0]["tags"] = bad
    with pytest.raises(WireError) as exc:
        decode_batch(with_header(header, columns))
    assert exc.value.reason == "bad-header"


def test_influx_gets_the_allowed_keys_only() -> None:
    lines = batch_to_lines(batch(REFS), "window", InfluxConfig().allowed_tags)
    assert lines[0].startswith(
        "window,device_id=dev-1,node=kitchen,sensor=temp,unit=degC,window=10s,"
        "building=b1,site=berlin "
    )
    assert ",secret=" not in lines[1] and ",site=berlin " in lines[1]
    assert lines[2].split(" ")[0].endswith("window=10s")
    assert batch_to_lines(batch(REFS))[0].split(" ")[0].endswith("window=10s")
    with pytest.raises(Invalid):
        InfluxConfig(tag_keys=("node",))


def test_the_lake_keeps_every_tag_and_reads_old_objects() -> None:
    import pyarrow.parquet as pq

    b = batch(REFS)
    ((_, data),) = batch_objects(b)
    (back,) = table_to_batches(read_table(data))
    assert back.sensors == REFS
    # an object written before the column: read with empty tags
    table = pq.read_table(io.BytesIO(data)).drop_columns(["tags"])
    out = io.BytesIO()
    pq.write_table(table, out)
    (old,) = table_to_batches(read_table(out.getvalue()))
    assert [s.tags for s in old.sensors] == [(), (), ()]
    np.testing.assert_array_equal(old.mean, b.mean)


def test_agent_config_tags_and_node_tags() -> None:
    cfg = from_dict(
        AgentConfig,
        {"tags": ["site=berlin", "building=b1"],
         "node_tags": [{"match": "kitchen*", "tags": ["room=kitchen", "building=b2"]}]},
    )  # fmt: skip
    of = sensor_tags(cfg)
    assert of("kitchen-1") == (("building", "b2"), ("room", "kitchen"), ("site", "berlin"))
    assert of("hall") == (("building", "b1"), ("site", "berlin"))
    for bad, key in (
        ({"tags": ["site"]}, "tags"),
        ({"tags": ["node=x"]}, "tags"),
        ({"tags": ["site=a b"]}, "tags"),
        ({"tags": [f"k{i}=v" for i in range(9)]}, "tags"),
        ({"node_tags": [{"match": "*", "tags": ["Room=x"]}]}, "node_tags[0].tags"),
    ):
        with pytest.raises(ConfigError) as exc:
            from_dict(AgentConfig, bad, "agent.toml")
        assert exc.value.key == key, exc.value
    assert tags.parse(("b=2", "a=1")) == (("a", "1"), ("b", "2"))
