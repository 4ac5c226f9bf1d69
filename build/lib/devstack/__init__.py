"""Run the real services and the whole pipeline on one machine: for the demo and the tests.

Nothing here is used by the edge agent or the cloud ingestor in production.
"""
