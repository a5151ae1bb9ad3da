"""EDR sensor: capture, enrichment, local policy, response, outbox."""

__version__ = "0.1.0"
