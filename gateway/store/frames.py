"""Frames between the gateway and its child processes (the bulk writer, the measurements index): a 4-byte
big-endian length, then a msgpack body. A module of its own so that neither child imports the other's code."""

from __future__ import annotations

import struct
from typing import BinaryIO

__all__ = ["LEN", "read"]

LEN = struct.Struct("!I")


def read(stream: BinaryIO, n: int) -> bytes | None:
    """`n` bytes, or None at the end of the stream (the gateway closed the pipe)."""
    data = stream.read(n)
    return data if data and len(data) == n else None
