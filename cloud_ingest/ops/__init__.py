"""The operators' tools, which touch no data: the broker's ACL and config
(``broker``), the Grafana dashboards (``dashboards``), the certificate authority
(``pki``)."""
