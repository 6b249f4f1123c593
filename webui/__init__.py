"""Bosun's web UI and JSON API (Litestar)."""
