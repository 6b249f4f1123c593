"""Configuration: one TOML file plus BOSUN_<SECTION>_<KEY> overrides, validated once into a frozen value.

Every setting, its default and its help text live here; `bosun config show` and the README are derived
from these dataclasses. Precedence, lowest first: defaults, TOML file, environment, CLI flags.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from gateway.errors import ConfigError
from gateway.models import PRIORITIES
from gateway.topics import valid_filter

__all__ = ["Config", "describe", "load"]

_SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _help(text: str, default: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class GatewaySection:
    id: str = _help("Stable gateway id reported to HQ; empty means generated once and kept in the data dir.", "")
    site: str = _help("Default site name shown in the UI and mDNS records.", "site")
    data_dir: str = _help("Directory holding the SQLite database and generated secrets.", "./var")


@dataclass(frozen=True)
class MqttSection:
    bind: str = _help("Address the MQTT listener binds to.", "0.0.0.0")
    port: int = _help("MQTT TCP port (0 picks a free port).", 1883)
    ws_port: int = _help("MQTT over WebSocket port; -1 disables it.", -1)
    root: str = _help("First topic level of the device protocol.", "bosun")
    max_payload: int = _help("Largest accepted PUBLISH payload in bytes; larger ones are dropped and counted.", 65536)
    max_connections: int = _help("Most simultaneous MQTT connections; -1 is unlimited.", 5000)
    allow_anonymous: bool = _help("Accept clients without credentials (they only get the anonymous_* patterns).", False)
    anonymous_publish: list[str] = _help("Topic patterns anonymous clients may publish to.", [])
    anonymous_subscribe: list[str] = _help("Topic patterns anonymous clients may subscribe to.", [])
    anonymous_deny: list[str] = _help("Topic patterns anonymous clients may never use (wins over the allow lists).", [])
    max_inflight: int = _help(
        "Most unacknowledged QoS 1/2 messages in flight to one client; the rest wait in its session queue. "
        "Small windows cap a busy subscriber at one window per round trip.",
        1000,
    )
    session_queue_max: int = _help(
        "Most messages waiting for one client (offline or slow) beyond max_inflight; the oldest are dropped, counted.",
        1000,
    )
    connect_timeout_s: int = _help("Seconds a new connection has to send its CONNECT before it is closed.", 10)


@dataclass(frozen=True)
class HttpSection:
    bind: str = _help("Address the HTTP server binds to.", "0.0.0.0")
    port: int = _help("HTTP port for the web UI and the JSON API (0 picks a free port).", 8080)
    session_hours: int = _help("Hours a web UI sign-in lasts (a crew watch is 12 hours).", 12)


@dataclass(frozen=True)
class StoreSection:
    flush_ms: int = _help(
        "Extra milliseconds a group waits for more writes before it commits; 0 commits as soon as the previous "
        "group is done (groups then grow with the load).",
        0,
    )
    writer_process: bool = _help(
        "Commit traffic and measurement rows in a child process (keeps the GIL free for the broker).", True
    )
    batch_rows: int = _help("Most writes committed in one group.", 500)
    queue_max: int = _help("Most writes waiting for the writer; publishers wait beyond it (backpressure).", 20000)
    synchronous: str = _help(
        "SQLite synchronous mode for the write path: FULL survives a power cut (an acknowledged message is on disk), "
        "NORMAL only a crash.",
        "FULL",
    )
    max_db_mb: int = _help("Disk budget for the database; oldest measurements and traffic go first.", 1024)
    traffic_rows: int = _help("Rows kept in the traffic log.", 100000)
    traffic_payload_bytes: int = _help("Bytes of each payload kept in the traffic log.", 1024)
    traffic_rate: int = _help(
        "Most messages per second written to the traffic log (a diagnostic log; records are kept regardless); "
        "beyond it rows are skipped and counted, except for messages with an error. 0 is unlimited.",
        2000,
    )
    retention_check_s: int = _help("Seconds between retention checks.", 60)


@dataclass(frozen=True)
class PresenceSection:
    timeout_s: int = _help("A device with no message for this many seconds is marked offline.", 120)
    check_s: int = _help("Seconds between presence sweeps.", 5)


@dataclass(frozen=True)
class CallsSection:
    escalation_normal: list[int] = _help(
        "Escalation of a normal call, seconds after it was made without acceptance: re-notify the same watches, "
        "notify every watch and flag it, mark it overdue.",
        [60, 180, 600],
    )
    escalation_urgent: list[int] = _help("Escalation tiers of an urgent call (as escalation_normal).", [30, 90, 300])
    escalation_emergency: list[int] = _help(
        "Escalation tiers of an emergency call (it already goes to every watch at once).", [15, 30, 120]
    )
    press_priority: list[str] = _help(
        "press_type=priority pairs: the priority a kind of press asks for (the highest of the payload's, this "
        "and the device's call_priority wins).",
        ["long=urgent"],
    )
    check_ms: int = _help("Milliseconds between escalation checks.", 250)


@dataclass(frozen=True)
class UplinkSection:
    url: str = _help(
        "Where records go: https://hq.example (POST {url}/api/v1/ingest) or mqtts://broker:8883 (an MQTT bridge); "
        "empty keeps everything in the outbox.",
        "",
    )
    token: str = _help("This gateway's bearer token at HQ (`bosun hq gateway add ID` prints it); MQTT password.", "")
    client_cert: str = _help("PEM client certificate (with its key, or see client_key) for mutual TLS.", "")
    client_key: str = _help("PEM private key of client_cert, when it is in a file of its own.", "")
    ca_file: str = _help("PEM CA bundle that signs HQ's certificate (default: the system's).", "")
    topic_prefix: str = _help("MQTT bridge: batches go to {topic_prefix}/{gateway id}/{lane} at QoS 1.", "bosun-hq")
    batch_records: int = _help("Most records in one batch.", 10000)
    timeout_s: int = _help("Seconds one send may take before it counts as failed.", 30)
    backoff_max_s: int = _help("Longest wait between retries (exponential backoff with full jitter).", 300)
    max_bytes_per_s: int = _help("Bandwidth cap on the wire for metered links, bytes per second; 0 is unlimited.", 0)
    window: str = _help(
        "Local time window for state and telemetry, e.g. 22:00-06:00 (calls, alarms and audit always go); "
        "empty is always.",
        "",
    )
    state_budget_mb: int = _help("Bytes of unsent device-state records kept; the oldest go first, counted.", 64)
    max_age_h: int = _help(
        "Unsent state and telemetry records older than this many hours are dropped and the loss reported; 0 never.",
        0,
    )


@dataclass(frozen=True)
class TlsSection:
    port: int = _help(
        "MQTT over TLS port (8883): devices log in with a password or a client certificate from the gateway's own "
        "CA; 0 picks a free port, -1 turns TLS off.",
        8883,
    )
    hostnames: list[str] = _help(
        "Extra names and addresses for the server certificate (the host name, <host>.local, localhost and the "
        "host's addresses are always in it).",
        [],
    )
    server_days: int = _help("Lifetime of the broker's server certificate, in days.", 90)
    renew_days: int = _help("The server certificate is renewed automatically this many days before it expires.", 30)
    ca_days: int = _help("Lifetime of the gateway's own CA, created on the first start (ten years).", 3650)
    device_days: int = _help("Lifetime of a device certificate (never past the CA's own expiry).", 1825)
    ca_warn_days: int = _help("The UI and /healthz warn this many days before the CA expires.", 30)


@dataclass(frozen=True)
class DiscoverySection:
    enabled: bool = _help(
        "Advertise the gateway over mDNS (_mqtt, _mqtts, _http, _bosun) and list unprovisioned devices "
        "(_bosun-device._tcp) as pending.",
        True,
    )
    interfaces: list[str] = _help(
        "Addresses of the interfaces mDNS uses; empty: every interface (only loopback when the listeners bind "
        "127.0.0.1).",
        [],
    )


@dataclass(frozen=True)
class ProvisioningSection:
    token_hours: int = _help("Hours a provisioning token (a QR code) stays valid; each is single use.", 24)
    rate_per_min: int = _help("Most provisioning attempts per minute from one client address.", 10)
    broker_host: str = _help(
        "Host name or address devices are told to reach the broker at (QR codes, provision answers); empty: this "
        "host's name with .local.",
        "",
    )


@dataclass(frozen=True)
class LogSection:
    level: str = _help("Log level: DEBUG, INFO, WARNING or ERROR.", "INFO")
    format: str = _help("Log format: 'text' for people, 'json' for journald.", "text")


@dataclass(frozen=True)
class Config:
    gateway: GatewaySection = field(default_factory=GatewaySection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    http: HttpSection = field(default_factory=HttpSection)
    store: StoreSection = field(default_factory=StoreSection)
    presence: PresenceSection = field(default_factory=PresenceSection)
    calls: CallsSection = field(default_factory=CallsSection)
    uplink: UplinkSection = field(default_factory=UplinkSection)
    log: LogSection = field(default_factory=LogSection)
    tls: TlsSection = field(default_factory=TlsSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    provisioning: ProvisioningSection = field(default_factory=ProvisioningSection)

    @property
    def data_dir(self) -> Path:
        return Path(self.gateway.data_dir)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "bosun.db"


_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("store", "synchronous"): ("NORMAL", "FULL", "EXTRA"),
    ("log", "level"): ("DEBUG", "INFO", "WARNING", "ERROR"),
    ("log", "format"): ("text", "json"),
}
_PORTS = {("mqtt", "port"), ("http", "port")}


def _sections() -> dict[str, type[Any]]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _expected(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if get_origin(tp) is list:
        return "a list of integers" if get_args(tp) == (int,) else "a list of strings"
    return "a string"


def _coerce(name: str, tp: Any, value: Any, from_env: bool) -> Any:
    """Turn a TOML or environment value into the field's type, or raise ConfigError naming the key."""
    bad = ConfigError(f"{name}: expected {_expected(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if (
            from_env
            and isinstance(value, str)
            and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off")
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise bad
    if get_origin(tp) is list:
        if from_env and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if get_args(tp) == (int,):
            integers = isinstance(value, list) and all(
                (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and re.fullmatch(r"-?\d+", v))
                for v in value
            )
            if not integers:
                raise bad
            return [int(v) for v in value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad
    if isinstance(value, str):
        return value
    raise bad


def _validate(cfg: Config) -> None:
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}: expected one of {', '.join(choices)}, got {value!r}")
    for section, key in _PORTS:
        value = getattr(getattr(cfg, section), key)
        if not 0 <= value <= 65535:
            raise ConfigError(f"{section}.{key}: expected a port number 0-65535, got {value}")
    if not -1 <= cfg.mqtt.ws_port <= 65535:
        raise ConfigError(f"mqtt.ws_port: expected a port number 0-65535 or -1, got {cfg.mqtt.ws_port}")
    if not _SEGMENT.fullmatch(cfg.mqtt.root):
        raise ConfigError(f"mqtt.root: expected 1-64 characters of [A-Za-z0-9_-], got {cfg.mqtt.root!r}")
    if cfg.gateway.id and not _SEGMENT.fullmatch(cfg.gateway.id):
        raise ConfigError(f"gateway.id: expected 1-64 characters of [A-Za-z0-9_-], got {cfg.gateway.id!r}")
    positive = [
        ("store", "batch_rows"),
        ("store", "queue_max"),
        ("store", "max_db_mb"),
        ("store", "traffic_rows"),
        ("store", "retention_check_s"),
        ("mqtt", "max_inflight"),
        ("mqtt", "session_queue_max"),
        ("mqtt", "connect_timeout_s"),
        ("presence", "timeout_s"),
        ("presence", "check_s"),
        ("http", "session_hours"),
        ("mqtt", "max_payload"),
    ]
    for section, key in positive:
        value = getattr(getattr(cfg, section), key)
        if value <= 0:
            raise ConfigError(f"{section}.{key}: expected a positive integer, got {value}")
    if cfg.mqtt.max_inflight > 65535:
        raise ConfigError(
            f"mqtt.max_inflight: expected at most 65535 (packet identifiers), got {cfg.mqtt.max_inflight}"
        )
    if cfg.store.flush_ms < 0:
        raise ConfigError(f"store.flush_ms: expected 0 or more, got {cfg.store.flush_ms}")
    if cfg.store.traffic_rate < 0:
        raise ConfigError(f"store.traffic_rate: expected 0 or more, got {cfg.store.traffic_rate}")
    if cfg.store.traffic_payload_bytes < 0:
        raise ConfigError("store.traffic_payload_bytes: expected 0 or more")
    if cfg.mqtt.max_connections == 0 or cfg.mqtt.max_connections < -1:
        raise ConfigError(
            f"mqtt.max_connections: expected a positive integer or -1 (unlimited), got {cfg.mqtt.max_connections}"
        )
    for key in ("anonymous_publish", "anonymous_subscribe", "anonymous_deny"):
        for pattern in getattr(cfg.mqtt, key):
            if not valid_filter(pattern):
                raise ConfigError(
                    f"mqtt.{key}: {pattern!r} is not an MQTT topic filter ('#' only as a whole last "
                    "level, '+' only as a whole level)"
                )
    _validate_calls(cfg.calls)
    _validate_uplink(cfg.uplink)
    if not cfg.gateway.data_dir:
        raise ConfigError("gateway.data_dir: expected a directory path, got an empty string")
    _validate_security(cfg)


def _validate_calls(calls: CallsSection) -> None:
    for priority in PRIORITIES:
        tiers = getattr(calls, f"escalation_{priority}")
        if len(tiers) != 3 or tiers[0] <= 0 or not tiers[0] < tiers[1] < tiers[2]:
            raise ConfigError(
                f"calls.escalation_{priority}: expected three increasing positive numbers of seconds "
                f"(re-notify, notify all, overdue), got {tiers}"
            )
    for pair in calls.press_priority:
        press_type, _, priority = pair.partition("=")
        if not press_type.strip() or priority.strip() not in PRIORITIES:
            raise ConfigError(
                f"calls.press_priority: expected press_type=priority with a priority of {', '.join(PRIORITIES)}, "
                f"got {pair!r}"
            )
    if calls.check_ms <= 0:
        raise ConfigError(f"calls.check_ms: expected a positive integer, got {calls.check_ms}")


_WINDOW = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


def _validate_uplink(uplink: UplinkSection) -> None:
    scheme = uplink.url.partition("://")[0] if "://" in uplink.url else ""
    if uplink.url and (scheme not in ("http", "https", "mqtt", "mqtts") or not uplink.url.partition("://")[2]):
        raise ConfigError(f"uplink.url: expected http(s)://host[:port] or mqtt(s)://host[:port], got {uplink.url!r}")
    if uplink.window and not _WINDOW.fullmatch(uplink.window):
        raise ConfigError(f"uplink.window: expected HH:MM-HH:MM (local time), got {uplink.window!r}")
    if not valid_filter(uplink.topic_prefix) or any(c in uplink.topic_prefix for c in "+#"):
        raise ConfigError(f"uplink.topic_prefix: expected an MQTT topic without wildcards, got {uplink.topic_prefix!r}")
    for key in ("batch_records", "timeout_s", "backoff_max_s", "state_budget_mb"):
        if getattr(uplink, key) <= 0:
            raise ConfigError(f"uplink.{key}: expected a positive integer, got {getattr(uplink, key)}")
    for key in ("max_bytes_per_s", "max_age_h"):
        if getattr(uplink, key) < 0:
            raise ConfigError(f"uplink.{key}: expected 0 or more, got {getattr(uplink, key)}")


def _validate_security(cfg: Config) -> None:
    if not -1 <= cfg.tls.port <= 65535:
        raise ConfigError(f"tls.port: expected a port number 0-65535 or -1 (off), got {cfg.tls.port}")
    for key in ("server_days", "renew_days", "ca_days", "device_days", "ca_warn_days"):
        if getattr(cfg.tls, key) <= 0:
            raise ConfigError(f"tls.{key}: expected a positive integer, got {getattr(cfg.tls, key)}")
    if cfg.tls.renew_days >= cfg.tls.server_days:
        raise ConfigError(
            f"tls.renew_days: expected fewer days than tls.server_days ({cfg.tls.server_days}), "
            f"got {cfg.tls.renew_days}"
        )
    for key in ("token_hours", "rate_per_min"):
        if getattr(cfg.provisioning, key) <= 0:
            raise ConfigError(f"provisioning.{key}: expected a positive integer, got {getattr(cfg.provisioning, key)}")


def press_priorities(calls: CallsSection) -> dict[str, str]:
    """The press_priority pairs as a mapping (validated at load)."""
    pairs = (pair.partition("=") for pair in calls.press_priority)
    return {press_type.strip(): priority.strip() for press_type, _, priority in pairs}


def load(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read the TOML file (if any), apply BOSUN_* variables and `overrides` ("section.key": value)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (TOML files are UTF-8)") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    env = environ if environ is not None else {}
    sections = _sections()
    for name in raw:
        if name not in sections:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(sections)})")
    for name in env:
        # a typo in a variable for a known section must not be silently ignored
        for sname, stype in sections.items():
            prefix = f"BOSUN_{sname.upper()}_"
            if name.startswith(prefix):
                keys = {f.name.upper() for f in dataclasses.fields(stype)}
                if name[len(prefix) :] not in keys:
                    raise ConfigError(
                        f"{name}: unknown setting (known in [{sname}]: {', '.join(sorted(k.lower() for k in keys))})"
                    )
    built: dict[str, Any] = {}
    for sname, stype in sections.items():
        table = raw.get(sname, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{sname}: expected a table [{sname}]")
        hints = get_type_hints(stype)
        known = {f.name for f in dataclasses.fields(stype)}
        for key in table:
            if key not in known:
                raise ConfigError(f"{sname}.{key}: unknown key (known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for key in known:
            tp = hints[key]
            dotted = f"{sname}.{key}"
            if key in table:
                values[key] = _coerce(dotted, tp, table[key], from_env=False)
            env_name = f"BOSUN_{sname.upper()}_{key.upper()}"
            if env_name in env:
                values[key] = _coerce(env_name, tp, env[env_name], from_env=True)
            if overrides and overrides.get(dotted) is not None:
                values[key] = _coerce(dotted, tp, overrides[dotted], from_env=True)
        built[sname] = stype(**values)
    cfg = Config(**built)
    _validate(cfg)
    return cfg


def load_from_cli(path: str | None, overrides: Mapping[str, Any]) -> Config:
    """The CLI's loader: the process environment is read here, once, never at import."""
    return load(path, os.environ, overrides)


def describe() -> list[tuple[str, str, Any, str]]:
    """Every setting as (env var, dotted key, default, help), for docs and `bosun config show`."""
    rows = []
    for sname, stype in _sections().items():
        for f in dataclasses.fields(stype):
            default: Any = f.default
            if default is dataclasses.MISSING:
                default = f.default_factory()  # type: ignore[operator]
            rows.append((f"BOSUN_{sname.upper()}_{f.name.upper()}", f"{sname}.{f.name}", default, f.metadata["help"]))
    return rows
