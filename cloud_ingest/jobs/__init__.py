"""The jobs an operator runs over the lake: ``replay`` rebuilds InfluxDB from it,
``rollup`` writes hourly and daily windows, ``compact`` folds a day's objects into
one, ``report`` summarises the fleet from InfluxDB (through ``influxql``)."""
