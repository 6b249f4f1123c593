"""Bosun's exception hierarchy; library exceptions are translated to these at the boundary.

BosunError
  ConfigError        a setting is missing or malformed; the message names the key
  StoreError         the database refused a write or is not what we expect
  RegistryError      a device, user, token or integration request is invalid
    NotFound         the named thing does not exist
    Conflict         it already exists, or its state forbids the change
    Forbidden        the caller's role may not do this to this record
  TopicError         a topic does not follow the device protocol (has a counted `reason`)
  PayloadError       a payload cannot be decoded (has a counted `reason`)
"""

__all__ = [
    "BosunError",
    "ConfigError",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PayloadError",
    "RegistryError",
    "StoreError",
    "TopicError",
]


class BosunError(Exception):
    """Base of every error Bosun raises on purpose."""


class ConfigError(BosunError):
    """A configuration value is invalid; the message names the key and the expected form."""


class StoreError(BosunError):
    """The database refused an operation."""


class RegistryError(BosunError):
    """A registry request (device, user, token, integration) is invalid."""


class NotFound(RegistryError):
    """The named record does not exist."""


class Conflict(RegistryError):
    """The record already exists."""


class Forbidden(RegistryError):
    """The caller's role may not do this to this particular record (an emergency call, say)."""


class TopicError(BosunError):
    """A topic is not a device-protocol topic; `reason` is the metrics label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class PayloadError(BosunError):
    """A payload cannot be decoded; `reason` is the metrics label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
