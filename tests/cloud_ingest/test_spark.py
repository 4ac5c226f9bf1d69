"""The lake's SQL on Spark (``local[2]``, pyspark, Java 17): the queries of
docs/lake-sql.md, ``cloud-ingest rollup`` and ``cloud-ingest compact``, held to
the same checks as on DuckDB (test_lake_sql.py, test_jobs_engines.py).

One test, so that one worker starts one JVM (about 6 s and 1.5 GB) for all of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_ingest.jobs.engines import Engine
from tests.cloud_ingest import test_jobs_engines as jobs
from tests.cloud_ingest import test_lake_sql as page

pytestmark = pytest.mark.integration


def test_the_page_the_rollups_and_compaction_on_spark(spark_engine: Engine, tmp_path: Path) -> None:
    assert spark_engine.name == "spark"
    lake = page.build_lake(tmp_path / "page")
    page.with_view(spark_engine, lake[0])
    page.check_latest(spark_engine)
    page.check_counts_means_and_quantiles(lake, spark_engine, (60, 190))
    jobs.check_rollups(jobs.build_lake(tmp_path / "rollup"), spark_engine, "1h")
    jobs.check_compaction(tmp_path / "compact", spark_engine, 150_000)  # in 2 or 3 buckets
