"""Bosun: an offline-first edge gateway (MQTT broker, durable store, crew calls, uplink to HQ)."""

__version__ = "0.1.0"
