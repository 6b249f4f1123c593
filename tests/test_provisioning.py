"""Provisioning over real HTTP: tokens and QR codes, enrolment (password), single use, expiry, rate limit, audit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BOSUN, Paho, Running, make_config, run_cmd, topic

from gateway import provisioning
from gateway.runtime import Gateway
from gateway.store import registry


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Running]:
    cfg = make_config(tmp_path / "var", **{"provisioning.rate_per_min": 5, "provisioning.broker_host": "127.0.0.1"})
    gateway = Gateway(cfg)
    await gateway.start()
    token = await gateway.writer.run(lambda c: registry.create_token(c, "admin", "tests", "test"))
    try:
        yield Running(gateway, cfg.data_dir, token)
    finally:
        await gateway.stop()


async def new_token(gw: Running, **body: Any) -> dict[str, Any]:
    async with gw.http() as http:
        r = await http.post(
            "/api/v1/provisioning/tokens", json={"site": "yacht", "room": "c101", "type": "button", **body}
        )
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


async def provision(gw: Running, **body: Any) -> Any:
    async with gw.http(token=None) as http:
        return await http.post("/api/v1/provision", json=body)


async def test_token_comes_with_a_seed_004_qr_payload_and_an_svg(gw: Running) -> None:
    created = await new_token(gw)
    qr = created["qr"]
    assert qr["version"] == "2.0" and qr["protocol"] == "mqtt"
    assert qr["token"] == created["token"]
    assert (qr["site"], qr["room"], qr["deviceType"]) == ("yacht", "c101", "button")
    assert qr["mqttBrokerUrl"] == f"mqtts://127.0.0.1:{gw.gw.mqtts_port}"
    assert qr["caFingerprint"] == gw.gw.trust.ca.fingerprint  # type: ignore[union-attr]
    assert qr["provisionUrl"].endswith("/api/v1/provision")
    assert len(qr["configurationHash"]) == 64
    assert created["qr_svg"].startswith("<svg") and "</svg>" in created["qr_svg"]
    stored = gw.rows("SELECT token_hash, token_id FROM provisioning_tokens")
    assert stored == [(provisioning._hash(created["token"]), created["token_id"])]  # only the hash is kept
    async with gw.http() as http:
        listed = (await http.get("/api/v1/provisioning/tokens")).json()
    assert [t["token_id"] for t in listed] == [created["token_id"]] and "token" not in listed[0]


async def test_a_token_provisions_exactly_one_device(gw: Running, paho_clients: Callable[..., Paho]) -> None:
    created = await new_token(gw)
    r = await provision(gw, token=created["token"], device_id="btn-101")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["username"] == "btn-101" and len(body["password"]) >= 22
    assert body["certificate"] is None and body["ca_certificate"].startswith("-----BEGIN CERTIFICATE-----")
    assert body["broker"] == f"mqtts://127.0.0.1:{gw.gw.mqtts_port}"
    assert body["brokers"]["mqtt"] == f"mqtt://127.0.0.1:{gw.mqtt_port}"
    assert gw.rows("SELECT site, room, type FROM devices WHERE device_id = 'btn-101'") == [("yacht", "c101", "button")]

    client = paho_clients(gw.mqtt_port, "btn-101", "btn-101", body["password"])
    assert await asyncio.to_thread(client.connect) == 0
    await asyncio.to_thread(client.publish, topic("btn-101", "status"), json.dumps({"battery": 80}))
    assert await gw.wait_for("SELECT battery FROM devices WHERE device_id = 'btn-101' AND battery = 80")

    again = await provision(gw, token=created["token"], device_id="btn-102")
    assert again.status_code == 409
    assert "already used" in again.json()["message"] and "btn-101" in again.json()["message"]
    assert gw.rows("SELECT count(*) FROM devices") == [(1,)]


async def test_concurrent_uses_of_one_token_enrol_one_device(gw: Running) -> None:
    created = await new_token(gw)
    replies = await asyncio.gather(*(provision(gw, token=created["token"], device_id=f"btn-{i}") for i in range(4)))
    assert sorted(r.status_code for r in replies) == [201, 409, 409, 409]
    assert gw.rows("SELECT count(*) FROM devices") == [(1,)]


async def test_expired_and_unknown_tokens_are_refused_with_clear_errors(gw: Running) -> None:
    created = await new_token(gw, ttl_hours=0.0001)  # 0.36 s
    await asyncio.sleep(0.5)
    r = await provision(gw, token=created["token"], device_id="btn-1")
    assert r.status_code == 403
    assert f"provisioning token {created['token_id']} expired at" in r.json()["message"]
    r = await provision(gw, token="not-a-token", device_id="btn-1")
    assert r.status_code == 403 and "unknown provisioning token" in r.json()["message"]
    assert gw.rows("SELECT count(*) FROM devices") == [(0,)]


async def test_a_token_bound_to_a_device_enrols_only_that_device(gw: Running) -> None:
    created = await new_token(gw, device_id="button-a4cf12000001")
    r = await provision(gw, token=created["token"], device_id="btn-9")
    assert r.status_code == 403 and "is for device button-a4cf12000001" in r.json()["message"]
    r = await provision(gw, token=created["token"], mac="A4:CF:12:00:00:01")
    assert r.status_code == 201, r.text
    assert r.json()["device_id"] == "button-a4cf12000001"


async def test_attempts_are_rate_limited_per_address_and_audited(gw: Running) -> None:
    replies = [await provision(gw, token=f"guess-{i}", device_id="btn-1") for i in range(7)]
    assert [r.status_code for r in replies] == [403] * 5 + [429] * 2
    assert 1 <= int(replies[-1].headers["retry-after"]) <= 61
    assert "too many provisioning attempts" in replies[-1].json()["message"]
    audited = gw.rows("SELECT actor, action, detail FROM audit_log WHERE action LIKE 'provision.%' ORDER BY id")
    assert [a for _, a, _ in audited] == ["provision.refused"] * 6  # five refusals, then one row for the burst
    assert all(actor == "address:127.0.0.1" for actor, _, _ in audited)
    assert json.loads(audited[-1][2])["reason"] == "rate limited"


async def test_enrolment_is_audited_with_the_token_and_address(gw: Running) -> None:
    created = await new_token(gw)
    assert (await provision(gw, token=created["token"], mac="a4:cf:12:00:00:02")).status_code == 201
    rows = gw.rows("SELECT actor, target, detail FROM audit_log WHERE action = 'provision.enrolled'")
    assert len(rows) == 1
    actor, target, detail = rows[0]
    assert (actor, target) == ("address:127.0.0.1", "button-a4cf12000002")
    assert json.loads(detail)["token_id"] == created["token_id"]


async def test_a_printable_sheet_makes_one_token_per_room(gw: Running) -> None:
    async with gw.http() as http:
        r = await http.post(
            "/api/v1/provisioning/sheets", json={"site": "yacht", "type": "button", "rooms": ["c101", "c102", "c103"]}
        )
    assert r.status_code == 201, r.text
    tokens = r.json()["tokens"]
    assert [t["room"] for t in tokens] == ["c101", "c102", "c103"]
    assert len({t["token"] for t in tokens}) == 3 and all(t["qr_svg"].startswith("<svg") for t in tokens)


async def test_crew_may_not_create_tokens_and_nobody_needs_a_login_to_enrol(gw: Running) -> None:
    crew = await gw.gw.writer.run(lambda c: registry.add_user(c, "deckhand", "crew", "long-password-1", "test"))
    token = await gw.gw.writer.run(lambda c: registry.create_token(c, crew.username, None, "test"))
    async with gw.http(token=token) as http:
        r = await http.post("/api/v1/provisioning/tokens", json={"site": "yacht", "room": "c1", "type": "button"})
    assert r.status_code == 403
    async with gw.http(token=None) as http:
        assert (await http.get("/api/v1/provisioning/tokens")).status_code == 401
        ca = await http.get("/api/v1/provisioning/ca.pem")
    assert ca.status_code == 200 and ca.text.startswith("-----BEGIN CERTIFICATE-----")


async def test_cli_creates_a_token_the_api_accepts(gw: Running, tmp_path: Path) -> None:
    svg = tmp_path / "qr.svg"
    done = await run_cmd(
        *BOSUN, "security", "token", "--data-dir", str(gw.data_dir), "--site", "yacht", "--room", "c7",
        "--type", "sensor", "--svg", str(svg),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    secret = out.splitlines()[1].strip()
    payload = json.loads(out[out.index("{") :])
    assert payload["token"] == secret and payload["room"] == "c7"
    assert svg.read_text().startswith("<?xml") or svg.read_text().startswith("<svg")
    r = await provision(gw, token=secret, device_id="temp-7")
    assert r.status_code == 201, r.text
    assert r.json()["type"] == "sensor"
    started = time.monotonic()
    listed = await run_cmd(*BOSUN, "security", "tokens", "--all", "--data-dir", str(gw.data_dir))
    assert "used" in listed.stdout.decode() and "temp-7" in listed.stdout.decode()
    assert time.monotonic() - started < 20


# -- the pages ---------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _browser(gw: Running, role: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A signed-in browser-like client and its CSRF token."""
    password = "correct-horse-1"
    await gw.gw.writer.run(lambda c: registry.add_user(c, f"{role}-1", role, password, "test"))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        r = await client.post("/login", data={"username": f"{role}-1", "password": password, "next": "/calls"})
        assert r.status_code == 303, r.text
        page = await client.get("/calls")
        csrf = re.search(r'name="csrf" content="([^"]+)"', page.text)
        assert csrf is not None
        yield client, csrf.group(1)


async def test_installer_makes_a_qr_code_and_a_sheet_from_the_page(gw: Running) -> None:
    async with _browser(gw, "installer") as (client, csrf):
        page = await client.get("/provisioning")
        assert page.status_code == 200 and 'href="/provisioning"' in page.text and "No device is waiting" in page.text
        made = await client.post(
            "/provisioning/token", data={"_csrf": csrf, "site": "yacht", "room": "c204", "type": "button"}
        )
        assert made.status_code == 201
        assert made.text.count("<svg") == 1 and "shown only once" in made.text
        token_id = gw.rows("SELECT token_id FROM provisioning_tokens")[0][0]
        assert f'data-token="{token_id}"' in made.text
        bad = await client.post(
            "/provisioning/token", data={"_csrf": csrf, "site": "yacht", "room": "c 1", "type": "x"}
        )
        assert bad.status_code == 400 and "must be 1-64 characters" in bad.text
        sheet = await client.post(
            "/provisioning/sheet", data={"_csrf": csrf, "site": "yacht", "type": "button", "rooms": "d1, d2 d3"}
        )
        assert sheet.status_code == 201 and sheet.text.count("<svg") == 3 and "<b>d2</b>" in sheet.text
        again = await client.get("/provisioning")
        assert again.text.count('<tr data-token="') == 4 and "<svg" not in again.text  # a QR code is shown once


async def test_security_page_simulates_and_revokes_and_crew_cannot_open_it(gw: Running) -> None:
    created = await new_token(gw)
    assert (await provision(gw, token=created["token"], device_id="btn-5")).status_code == 201
    async with _browser(gw, "admin") as (client, csrf):
        page = await client.get(
            "/security", params={"who": "btn-5", "action": "publish", "topic": "bosun/yacht/c101/button/btn-6/press"}
        )
        assert page.status_code == 200 and gw.gw.trust.ca.fingerprint in page.text  # type: ignore[union-attr]
        assert "<b>Refused</b>: devices publish only under bosun/yacht/c101/button/btn-5/" in page.text
        revoked = await client.post("/security/revoke", data={"_csrf": csrf, "device": "btn-5", "reason": "lost"})
        assert revoked.status_code == 303 and revoked.headers["location"].startswith("/security?done=revoked")
        shown = await client.get(revoked.headers["location"])
        assert "btn-5 is revoked." in shown.text and "<b>btn-5</b>" in shown.text
        twice = await client.post("/security/revoke", data={"_csrf": csrf, "device": "btn-5"})
        assert twice.status_code == 409 and "already revoked" in twice.text
    async with _browser(gw, "crew") as (crew, _):
        assert (await crew.get("/security")).status_code == 403
        assert 'href="/provisioning"' not in (await crew.get("/calls")).text


async def test_profiles_are_managed_by_admins_and_given_at_enrolment(gw: Running) -> None:
    async with gw.http() as http:
        r = await http.put("/api/v1/security/profiles/button", json={"actions": ["press", "ack"], "max_qos": 1})
        assert r.status_code == 200, r.text
        assert r.json() == {
            "name": "button",
            "device_type": None,
            "actions": ["press", "ack"],
            "max_qos": 1,
            "retain": True,
            "max_connections": 1,
            "client_cert_required": False,
            "description": None,
        }
        bad = await http.put("/api/v1/security/profiles/x", json={"max_qos": 3})
        assert bad.status_code == 400 and "max_qos must be 0, 1 or 2" in bad.json()["message"]
        bad = await http.put("/api/v1/security/profiles/x", json={"actions": ["cmd/#"]})
        assert bad.status_code == 400 and "one topic level" in bad.json()["message"]
    created = await new_token(gw)  # a profile named after the device type is that type's default
    r = await provision(gw, token=created["token"], device_id="btn-1")
    assert r.status_code == 201 and r.json()["profile"] == "button"
    assert gw.rows("SELECT profile FROM devices WHERE device_id = 'btn-1'") == [("button",)]
    async with gw.http() as http:
        in_use = await http.delete("/api/v1/security/profiles/button")
        assert in_use.status_code == 400 and "assigned to 1 device" in in_use.json()["message"]
        assert (await http.put("/api/v1/devices/btn-1/profile", json={"profile": None})).status_code == 200
        assert (await http.delete("/api/v1/security/profiles/button")).status_code == 204
        assert (await http.get("/api/v1/security/profiles")).json() == []
        unknown = await http.put("/api/v1/devices/btn-1/profile", json={"profile": "nope"})
        assert unknown.status_code == 404
    assert gw.gw.trust.profile("btn-1") is None
