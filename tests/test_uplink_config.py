"""The [uplink] settings: a bad value stops start-up with a message naming the key."""

from __future__ import annotations

import pytest

from gateway import config
from gateway.errors import ConfigError


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BOSUN_UPLINK_URL": "ftp://hq"}, "uplink.url: expected http(s)://host"),
        ({"BOSUN_UPLINK_URL": "https://"}, "uplink.url: expected http(s)://host"),
        ({"BOSUN_UPLINK_URL": "hq.example"}, "uplink.url: expected http(s)://host"),
        ({"BOSUN_UPLINK_WINDOW": "22-06"}, "uplink.window: expected HH:MM-HH:MM"),
        ({"BOSUN_UPLINK_WINDOW": "24:00-06:00"}, "uplink.window: expected HH:MM-HH:MM"),
        ({"BOSUN_UPLINK_TOPIC_PREFIX": "fleet/#"}, "uplink.topic_prefix: expected an MQTT topic without wildcards"),
        ({"BOSUN_UPLINK_BATCH_RECORDS": "0"}, "uplink.batch_records: expected a positive integer"),
        ({"BOSUN_UPLINK_BACKOFF_MAX_S": "0"}, "uplink.backoff_max_s: expected a positive integer"),
        ({"BOSUN_UPLINK_MAX_BYTES_PER_S": "-1"}, "uplink.max_bytes_per_s: expected 0 or more"),
        ({"BOSUN_UPLINK_MAX_AGE_H": "-1"}, "uplink.max_age_h: expected 0 or more"),
        ({"BOSUN_UPLINK_TOKN": "x"}, "BOSUN_UPLINK_TOKN: unknown setting"),
    ],
)
def test_bad_uplink_settings_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(None, env)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8090", "https://hq.example.com/base", "mqtt://broker:1883", "mqtts://u:p@broker"]
)
def test_good_urls(url: str) -> None:
    assert config.load(None, {"BOSUN_UPLINK_URL": url}).uplink.url == url
