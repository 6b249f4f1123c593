"""Table-driven tests for gateway.config: defaults, TOML, BOSUN_* variables, overrides, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gateway import config
from gateway.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bosun.toml"
    path.write_text(text, encoding="utf-8")
    return path


def value(cfg: config.Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


# --- defaults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "expected"),
    [
        ("gateway.id", ""),
        ("gateway.site", "site"),
        ("gateway.data_dir", "./var"),
        ("mqtt.bind", "0.0.0.0"),
        ("mqtt.port", 1883),
        ("mqtt.ws_port", -1),
        ("mqtt.root", "bosun"),
        ("mqtt.max_payload", 65536),
        ("mqtt.max_connections", 5000),
        ("mqtt.allow_anonymous", False),
        ("mqtt.anonymous_publish", []),
        ("mqtt.anonymous_subscribe", []),
        ("mqtt.anonymous_deny", []),
        ("http.bind", "0.0.0.0"),
        ("http.port", 8080),
        ("http.session_hours", 12),
        ("store.flush_ms", 0),
        ("store.batch_rows", 500),
        ("store.queue_max", 20000),
        ("store.synchronous", "FULL"),
        ("store.max_db_mb", 1024),
        ("store.traffic_rows", 100000),
        ("store.traffic_payload_bytes", 1024),
        ("store.retention_check_s", 60),
        ("presence.timeout_s", 120),
        ("presence.check_s", 5),
        ("log.level", "INFO"),
        ("log.format", "text"),
        ("calls.escalation_normal", [60, 180, 600]),
        ("calls.escalation_urgent", [30, 90, 300]),
        ("calls.escalation_emergency", [15, 30, 120]),
        ("calls.press_priority", ["long=urgent"]),
        ("calls.check_ms", 250),
        ("uplink.url", ""),
        ("uplink.token", ""),
        ("uplink.client_cert", ""),
        ("uplink.client_key", ""),
        ("uplink.ca_file", ""),
        ("uplink.topic_prefix", "bosun-hq"),
        ("uplink.batch_records", 10000),
        ("uplink.timeout_s", 30),
        ("uplink.backoff_max_s", 300),
        ("uplink.max_bytes_per_s", 0),
        ("uplink.window", ""),
        ("uplink.state_budget_mb", 64),
        ("uplink.max_age_h", 0),
        ("tls.port", 8883),
        ("tls.hostnames", []),
        ("tls.server_days", 90),
        ("tls.renew_days", 30),
        ("tls.ca_days", 3650),
        ("tls.device_days", 1825),
        ("tls.ca_warn_days", 30),
        ("discovery.enabled", True),
        ("discovery.interfaces", []),
        ("provisioning.token_hours", 24),
        ("provisioning.rate_per_min", 10),
        ("provisioning.broker_host", ""),
    ],
)
def test_defaults(dotted: str, expected: Any) -> None:
    cfg = config.load(None, {})
    assert value(cfg, dotted) == expected
    assert type(value(cfg, dotted)) is type(expected)


def test_defaults_ignore_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # load() reads only the mapping it is given (house rule 7)
    monkeypatch.setenv("BOSUN_MQTT_PORT", "1999")
    assert config.load().mqtt.port == 1883
    assert config.load(None, {}).mqtt.port == 1883


def test_config_is_frozen_and_derives_paths() -> None:
    cfg = config.load(None, {}, {"gateway.data_dir": "/srv/bosun"})
    assert cfg.data_dir == Path("/srv/bosun")
    assert cfg.db_path == Path("/srv/bosun/bosun.db")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mqtt.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mqtt = cfg.mqtt  # type: ignore[misc]


def test_list_defaults_are_not_shared() -> None:
    a = config.load(None, {})
    a.mqtt.anonymous_deny.append("x/#")
    assert config.load(None, {}).mqtt.anonymous_deny == []


# --- TOML file ------------------------------------------------------------------------------------


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[gateway]
id = "gw-01"
site = "M/Y Aurora"
data_dir = "/var/lib/bosun"

[mqtt]
port = 1884
root = "obedio"
allow_anonymous = true
anonymous_subscribe = ["public/#", "weather/+"]
ws_port = 9001

[store]
synchronous = "FULL"
traffic_payload_bytes = 0

[log]
level = "DEBUG"
format = "json"
""",
    )
    cfg = config.load(path, {})
    assert cfg.gateway.id == "gw-01"
    assert cfg.gateway.site == "M/Y Aurora"
    assert cfg.gateway.data_dir == "/var/lib/bosun"
    assert cfg.mqtt.port == 1884
    assert cfg.mqtt.root == "obedio"
    assert cfg.mqtt.allow_anonymous is True
    assert cfg.mqtt.anonymous_subscribe == ["public/#", "weather/+"]
    assert cfg.mqtt.ws_port == 9001
    assert cfg.store.synchronous == "FULL"
    assert cfg.store.traffic_payload_bytes == 0
    assert cfg.log.level == "DEBUG"
    assert cfg.log.format == "json"
    # untouched keys keep their defaults
    assert cfg.http.port == 8080
    assert cfg.store.flush_ms == 0


def test_toml_path_may_be_a_string(tmp_path: Path) -> None:
    assert config.load(str(write(tmp_path, "[http]\nport = 8081\n")), {}).http.port == 8081


def test_empty_toml_file_gives_defaults(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, ""), {}) == config.load(None, {})


# --- environment ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "dotted", "expected"),
    [
        ({"BOSUN_MQTT_PORT": "1884"}, "mqtt.port", 1884),
        ({"BOSUN_MQTT_PORT": " 1884 "}, "mqtt.port", 1884),
        ({"BOSUN_MQTT_PORT": "0"}, "mqtt.port", 0),
        ({"BOSUN_MQTT_WS_PORT": "-1"}, "mqtt.ws_port", -1),
        ({"BOSUN_MQTT_WS_PORT": "9001"}, "mqtt.ws_port", 9001),
        ({"BOSUN_GATEWAY_DATA_DIR": "/data"}, "gateway.data_dir", "/data"),
        ({"BOSUN_GATEWAY_ID": "gw-7"}, "gateway.id", "gw-7"),
        ({"BOSUN_MQTT_ROOT": "obedio"}, "mqtt.root", "obedio"),
        ({"BOSUN_STORE_SYNCHRONOUS": "EXTRA"}, "store.synchronous", "EXTRA"),
        ({"BOSUN_LOG_LEVEL": "WARNING"}, "log.level", "WARNING"),
        # booleans
        *[
            ({"BOSUN_MQTT_ALLOW_ANONYMOUS": word}, "mqtt.allow_anonymous", True)
            for word in ("1", "true", "True", "TRUE", "yes", "on")
        ],
        *[
            ({"BOSUN_MQTT_ALLOW_ANONYMOUS": word}, "mqtt.allow_anonymous", False)
            for word in ("0", "false", "FALSE", "no", "off")
        ],
        # lists: comma separated, blanks dropped, empty string is an empty list
        (
            {"BOSUN_MQTT_ANONYMOUS_SUBSCRIBE": "public/#,weather/+"},
            "mqtt.anonymous_subscribe",
            ["public/#", "weather/+"],
        ),
        (
            {"BOSUN_MQTT_ANONYMOUS_SUBSCRIBE": " public/# , , weather/+ ,"},
            "mqtt.anonymous_subscribe",
            ["public/#", "weather/+"],
        ),
        ({"BOSUN_MQTT_ANONYMOUS_DENY": "bosun/#"}, "mqtt.anonymous_deny", ["bosun/#"]),
        ({"BOSUN_MQTT_ANONYMOUS_DENY": ""}, "mqtt.anonymous_deny", []),
        # lists of integers: escalation tiers
        ({"BOSUN_CALLS_ESCALATION_NORMAL": "1, 2,3"}, "calls.escalation_normal", [1, 2, 3]),
        (
            {"BOSUN_CALLS_PRESS_PRIORITY": "long=emergency,double=urgent"},
            "calls.press_priority",
            ["long=emergency", "double=urgent"],
        ),
    ],
    ids=lambda v: str(v)[:60],
)
def test_environment(env: dict[str, str], dotted: str, expected: Any) -> None:
    got = value(config.load(None, env), dotted)
    assert got == expected
    assert type(got) is type(expected)


def test_environment_names_are_case_sensitive() -> None:
    assert config.load(None, {"bosun_mqtt_port": "1884"}).mqtt.port == 1883


# --- precedence: defaults < file < environment < overrides ----------------------------------------


@pytest.mark.parametrize(
    ("in_file", "in_env", "in_overrides", "expected"),
    [
        (False, False, False, 1883),
        (True, False, False, 1001),
        (False, True, False, 1002),
        (True, True, False, 1002),
        (False, False, True, 1003),
        (True, False, True, 1003),
        (False, True, True, 1003),
        (True, True, True, 1003),
    ],
)
def test_precedence(tmp_path: Path, in_file: bool, in_env: bool, in_overrides: bool, expected: int) -> None:
    path = write(tmp_path, "[mqtt]\nport = 1001\n") if in_file else None
    env = {"BOSUN_MQTT_PORT": "1002"} if in_env else {}
    overrides = {"mqtt.port": 1003} if in_overrides else {}
    assert config.load(path, env, overrides).mqtt.port == expected


def test_precedence_is_per_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nport = 1001\nroot = 'fromfile'\n\n[http]\nport = 2001\n")
    cfg = config.load(path, {"BOSUN_HTTP_PORT": "2002", "BOSUN_LOG_FORMAT": "json"}, {"log.level": "DEBUG"})
    assert (cfg.mqtt.port, cfg.mqtt.root, cfg.http.port, cfg.log.format, cfg.log.level) == (
        1001,
        "fromfile",
        2002,
        "json",
        "DEBUG",
    )


@pytest.mark.parametrize(
    ("overrides", "dotted", "expected"),
    [
        ({"mqtt.port": 0}, "mqtt.port", 0),
        (
            {"mqtt.port": "1885"},
            "mqtt.port",
            1885,
        ),  # CLI flags arrive as strings, parsed like the environment
        ({"mqtt.allow_anonymous": True}, "mqtt.allow_anonymous", True),
        ({"mqtt.allow_anonymous": "yes"}, "mqtt.allow_anonymous", True),
        ({"mqtt.anonymous_publish": ["a/#"]}, "mqtt.anonymous_publish", ["a/#"]),
        ({"mqtt.anonymous_publish": "a/#,b"}, "mqtt.anonymous_publish", ["a/#", "b"]),
        ({"mqtt.port": None}, "mqtt.port", 1883),  # None means "flag not given"
    ],
    ids=str,
)
def test_overrides(overrides: dict[str, Any], dotted: str, expected: Any) -> None:
    assert value(config.load(None, {}, overrides), dotted) == expected


def test_override_false_beats_environment_true() -> None:
    cfg = config.load(None, {"BOSUN_MQTT_ALLOW_ANONYMOUS": "true"}, {"mqtt.allow_anonymous": False})
    assert cfg.mqtt.allow_anonymous is False


def test_override_none_keeps_environment() -> None:
    assert config.load(None, {"BOSUN_MQTT_PORT": "1002"}, {"mqtt.port": None}).mqtt.port == 1002


# --- errors: each names the key and the expected form ---------------------------------------------


@pytest.mark.parametrize(
    ("toml", "env", "overrides", "fragments"),
    [
        # wrong types in the file
        ("[mqtt]\nport = 'abc'", {}, {}, ["mqtt.port", "an integer", "'abc'"]),
        ("[mqtt]\nport = 1883.0", {}, {}, ["mqtt.port", "an integer"]),
        ("[mqtt]\nport = true", {}, {}, ["mqtt.port", "an integer"]),
        ("[mqtt]\nallow_anonymous = 'yes'", {}, {}, ["mqtt.allow_anonymous", "true or false"]),  # not in TOML
        ("[mqtt]\nallow_anonymous = 1", {}, {}, ["mqtt.allow_anonymous", "true or false"]),
        ("[mqtt]\nanonymous_deny = 'bosun/#'", {}, {}, ["mqtt.anonymous_deny", "a list of strings"]),
        ("[mqtt]\nanonymous_deny = ['a', 1]", {}, {}, ["mqtt.anonymous_deny", "a list of strings"]),
        ("[gateway]\nsite = 5", {}, {}, ["gateway.site", "a string"]),
        ("[gateway]\ndata_dir = ['a']", {}, {}, ["gateway.data_dir", "a string"]),
        # unknown names and wrong shapes
        ("[mqqt]\nport = 1", {}, {}, ["mqqt", "unknown section", "mqtt"]),
        ("port = 1", {}, {}, ["port", "unknown section"]),
        ("[mqtt]\nprot = 1", {}, {}, ["mqtt.prot", "unknown key", "port"]),
        ("mqtt = 5", {}, {}, ["mqtt", "expected a table [mqtt]"]),
        # wrong values in the environment name the variable
        (None, {"BOSUN_MQTT_PORT": "abc"}, {}, ["BOSUN_MQTT_PORT", "an integer", "'abc'"]),
        (None, {"BOSUN_MQTT_PORT": "1883.5"}, {}, ["BOSUN_MQTT_PORT", "an integer"]),
        (None, {"BOSUN_MQTT_PORT": ""}, {}, ["BOSUN_MQTT_PORT", "an integer"]),
        (None, {"BOSUN_MQTT_ALLOW_ANONYMOUS": "maybe"}, {}, ["BOSUN_MQTT_ALLOW_ANONYMOUS", "true or false"]),
        (None, {"BOSUN_MQTT_ALLOW_ANONYMOUS": "2"}, {}, ["BOSUN_MQTT_ALLOW_ANONYMOUS", "true or false"]),
        (None, {"BOSUN_MQTT_ALLOW_ANONYMOUS": ""}, {}, ["BOSUN_MQTT_ALLOW_ANONYMOUS", "true or false"]),
        # wrong values in overrides name the dotted key
        (None, {}, {"mqtt.port": "abc"}, ["mqtt.port", "an integer"]),
        (None, {}, {"mqtt.port": True}, ["mqtt.port", "an integer"]),
        (None, {}, {"mqtt.allow_anonymous": "maybe"}, ["mqtt.allow_anonymous", "true or false"]),
        # values of the right type but out of range
        ("[mqtt]\nport = 65536", {}, {}, ["mqtt.port", "0-65535", "65536"]),
        ("[mqtt]\nport = -1", {}, {}, ["mqtt.port", "0-65535"]),
        (None, {"BOSUN_HTTP_PORT": "70000"}, {}, ["http.port", "0-65535", "70000"]),
        (None, {}, {"mqtt.ws_port": -2}, ["mqtt.ws_port", "-1"]),
        (None, {}, {"mqtt.ws_port": 65536}, ["mqtt.ws_port", "0-65535"]),
        (None, {}, {"tls.port": -2}, ["tls.port", "-1 (off)"]),
        ("[tls]\nrenew_days = 90", {}, {}, ["tls.renew_days", "fewer days than tls.server_days (90)"]),
        (None, {"BOSUN_TLS_CA_DAYS": "0"}, {}, ["tls.ca_days", "positive"]),
        (None, {}, {"provisioning.rate_per_min": 0}, ["provisioning.rate_per_min", "positive"]),
        ("[mqtt]\nroot = 'bosun/v1'", {}, {}, ["mqtt.root", "[A-Za-z0-9_-]", "'bosun/v1'"]),
        ("[mqtt]\nroot = ''", {}, {}, ["mqtt.root", "1-64"]),
        (None, {"BOSUN_MQTT_ROOT": "x" * 65}, {}, ["mqtt.root", "1-64"]),
        (None, {"BOSUN_GATEWAY_ID": "gw 1"}, {}, ["gateway.id", "[A-Za-z0-9_-]", "'gw 1'"]),
        ("[gateway]\ndata_dir = ''", {}, {}, ["gateway.data_dir", "directory"]),
        ("[store]\nsynchronous = 'normal'", {}, {}, ["store.synchronous", "NORMAL, FULL, EXTRA", "'normal'"]),
        (None, {"BOSUN_STORE_FLUSH_MS": "-1"}, {}, ["store.flush_ms", "0 or more"]),
        (None, {"BOSUN_LOG_LEVEL": "TRACE"}, {}, ["log.level", "DEBUG, INFO, WARNING, ERROR", "'TRACE'"]),
        (None, {"BOSUN_LOG_FORMAT": "xml"}, {}, ["log.format", "text, json"]),
        *[
            (None, {}, {key: 0}, [key, "a positive integer", "0"])
            for key in (
                "store.batch_rows",
                "store.queue_max",
                "store.max_db_mb",
                "store.traffic_rows",
                "store.retention_check_s",
                "presence.timeout_s",
                "presence.check_s",
                "mqtt.max_payload",
            )
        ],
        (None, {}, {"presence.timeout_s": -5}, ["presence.timeout_s", "a positive integer", "-5"]),
        (None, {}, {"store.traffic_payload_bytes": -1}, ["store.traffic_payload_bytes", "0 or more"]),
        # crew calls: tiers are three increasing seconds, press_priority pairs name a real priority
        ("[calls]\nescalation_normal = [60, 'x', 600]", {}, {}, ["calls.escalation_normal", "a list of integers"]),
        ("[calls]\nescalation_normal = [60, 180]", {}, {}, ["calls.escalation_normal", "three increasing"]),
        (None, {"BOSUN_CALLS_ESCALATION_URGENT": "30,20,40"}, {}, ["calls.escalation_urgent", "increasing"]),
        (None, {"BOSUN_CALLS_ESCALATION_URGENT": "1.5,2,3"}, {}, ["BOSUN_CALLS_ESCALATION_URGENT", "integers"]),
        (None, {}, {"calls.escalation_emergency": [0, 1, 2]}, ["calls.escalation_emergency", "positive"]),
        ("[calls]\npress_priority = ['long=high']", {}, {}, ["calls.press_priority", "normal, urgent, emergency"]),
        ("[calls]\npress_priority = ['long']", {}, {}, ["calls.press_priority", "'long'"]),
        (None, {}, {"calls.check_ms": 0}, ["calls.check_ms", "a positive integer"]),
    ],
    ids=lambda v: str(v)[:60],
)
def test_errors_name_the_key_and_the_form(
    tmp_path: Path, toml: str | None, env: dict[str, str], overrides: dict[str, Any], fragments: list[str]
) -> None:
    path = write(tmp_path, toml) if toml is not None else None
    with pytest.raises(ConfigError) as info:
        config.load(path, env, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_bad_toml_names_the_file_and_the_place(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nport = \n")
    with pytest.raises(ConfigError) as info:
        config.load(path, {})
    message = str(info.value)
    assert str(path) in message
    assert "not valid TOML" in message
    assert "line 2" in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(path, {})
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


def test_errors_are_not_chained_to_library_exceptions(tmp_path: Path) -> None:
    # translated once at the boundary: no "During handling of the above exception" noise for the user
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, "[mqtt\n"), {})
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize("kind", ["directory", "latin-1"])
def test_unreadable_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        path = tmp_path
    else:
        path = tmp_path / "latin.toml"
        path.write_bytes("[gateway]\nsite = 'Caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        config.load(path, {})
    assert str(path) in str(info.value)


def test_max_connections_below_minus_one_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.max_connections"):
        config.load(None, {}, {"mqtt.max_connections": -7})


@pytest.mark.parametrize("key", ["anonymous_publish", "anonymous_subscribe", "anonymous_deny"])
def test_anonymous_patterns_must_be_valid_filters(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"mqtt\.{key}"):
        config.load(None, {}, {f"mqtt.{key}": ["bosun#"]})


# --- describe -------------------------------------------------------------------------------------


def test_describe_lists_every_key_once_with_its_default_and_help() -> None:
    rows = config.describe()
    cfg = config.load(None, {})
    every = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, section.name))
    ]
    assert len(every) == 63
    assert [dotted for _, dotted, _, _ in rows] == every
    for env_name, dotted, default, help_text in rows:
        section, key = dotted.split(".")
        assert env_name == f"BOSUN_{section.upper()}_{key.upper()}"
        assert default == value(cfg, dotted), dotted
        assert help_text.strip(), dotted


_OTHER_CHOICE = {
    "store.synchronous": "NORMAL",
    "log.level": "ERROR",
    "log.format": "json",
    "uplink.url": "https://hq.example",
    "uplink.window": "22:00-06:00",
}


@pytest.mark.parametrize("row", config.describe(), ids=lambda row: row[0])
def test_every_described_environment_name_is_read_by_load(row: tuple[str, str, Any, str]) -> None:
    env_name, dotted, default, _ = row
    raw: str
    if isinstance(default, bool):
        raw, expected = ("false", False) if default else ("true", True)
    elif isinstance(default, int):
        raw, expected = str(default + 1), default + 1
    elif isinstance(default, list) and default and isinstance(default[0], int):
        raw, expected = "1,2,3", [1, 2, 3]
    elif dotted == "calls.press_priority":
        raw, expected = "double=emergency", ["double=emergency"]
    elif isinstance(default, list):
        raw, expected = "x/#,y", ["x/#", "y"]
    else:
        raw = expected = _OTHER_CHOICE.get(dotted, "alt-1")
    assert expected != default
    assert value(config.load(None, {env_name: raw}), dotted) == expected
