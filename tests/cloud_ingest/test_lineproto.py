from __future__ import annotations

import numpy as np

from cloud_ingest.sinks.lineproto import FLOAT_FIELDS, absent_bit, batch_to_lines, window_label
from shared.wire import STAT_FIELDS, SensorRef, WindowSpec, make_batch


def test_window_label() -> None:
    assert window_label(10_000_000_000) == "10s"
    assert window_label(500_000_000) == "500ms"
    assert window_label(1500) == "1500ns"


def test_lines_escape_tags_and_omit_nan() -> None:
    b = make_batch(
        device_id="d1",
        seq=1,
        created_ns=0,
        window=WindowSpec("tumbling", 10**10),
        sensors=(SensorRef("n1", "t", "deg C,x=y"),),
        columns={
            "sensor": [0, 0],
            "start_ns": [0, 10**10],
            "count": [2, 0],
            "invalid": [0, 3],
            **{f: [0.1, np.nan] for f in STAT_FIELDS},
        },
    )
    lines = batch_to_lines(b, "win dow")
    assert lines[0] == (
        r"win\ dow,device_id=d1,node=n1,sensor=t,unit=deg\ C\,x\=y,window=10s "
        "count=2i,invalid=0i,revision=0i,min=0.1,max=0.1,mean=0.1,stddev=0.1,first=0.1,"
        "last=0.1,sum=0.2,absent=896i 0"  # sum: count x mean without a sum column; 896: below
    )
    # the bits of p50, p90, p99 (this batch has no quantile columns: NaN)
    assert sum(absent_bit(f) for f in ("p50", "p90", "p99")) == 896
    all_absent = sum(absent_bit(f) for f in FLOAT_FIELDS)
    assert lines[1].endswith(f" count=0i,invalid=3i,revision=0i,absent={all_absent}i 10000000000")
