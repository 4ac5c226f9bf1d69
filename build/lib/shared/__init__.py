"""Code that the edge agent, the cloud ingestor and the simulator all use.

Nothing here talks to the network: the wire format, topic names, the local
reading format, config loading and the error hierarchy.
"""
