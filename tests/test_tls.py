"""TLS with real clients: CSR enrolment, mosquitto_pub with --cafile/--cert/--key, paho with client certificates,
the certificate's device id against the client id, revocation of both login methods, the live listener's renewal,
and the ACL simulator against the broker's own decisions."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Paho, Running, make_config, require, run_cmd, topic
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.runtime import Gateway
from gateway.store import registry


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Running]:
    cfg = make_config(tmp_path / "var", **{"provisioning.broker_host": "127.0.0.1"})
    gateway = Gateway(cfg)
    await gateway.start()
    token = await gateway.writer.run(lambda c: registry.create_token(c, "admin", "tests", "test"))
    try:
        yield Running(gateway, cfg.data_dir, token)
    finally:
        await gateway.stop()


class Identity:
    """A device's key (it never leaves the device), its certificate and the CA it trusts, as files."""

    def __init__(self, folder: Path, device_id: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.device_id = device_id
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.key_path = folder / f"{device_id}.key"
        self.key_path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.cert_path = folder / f"{device_id}.pem"
        self.ca_path = folder / "ca.pem"
        self.serial = ""

    def csr(self) -> str:
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)]))
            .sign(self.key, hashes.SHA256())
        )
        return request.public_bytes(serialization.Encoding.PEM).decode()

    def store(self, answer: dict[str, Any]) -> None:
        self.cert_path.write_text(answer["certificate"])
        self.ca_path.write_text(answer["ca_certificate"])
        self.serial = answer["serial"]


async def enrol(gw: Running, device_id: str, csr: str | None, room: str = "c101") -> dict[str, Any]:
    async with gw.http() as http:
        made = await http.post("/api/v1/provisioning/tokens", json={"site": "yacht", "room": room, "type": "button"})
        assert made.status_code == 201, made.text
    body: dict[str, Any] = {"token": made.json()["token"], "device_id": device_id}
    if csr is not None:
        body["csr"] = csr
    async with gw.http(token=None) as http:
        r = await http.post("/api/v1/provision", json=body)
    assert r.status_code == 201, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def enrol_with_certificate(gw: Running, folder: Path, device_id: str) -> Identity:
    identity = Identity(folder, device_id)
    identity.store(await enrol(gw, device_id, identity.csr()))
    return identity


def mosquitto_pub(gw: Running, ident: Identity, client_id: str, action: str, message: str) -> list[str]:
    return [
        require("mosquitto_pub"),
        "-h", "127.0.0.1", "-p", str(gw.gw.mqtts_port),
        "--cafile", str(ident.ca_path), "--cert", str(ident.cert_path), "--key", str(ident.key_path),
        "-i", client_id, "-q", "1", "-t", topic(ident.device_id, action), "-m", message,
    ]  # fmt: skip


async def test_a_csr_gets_a_certificate_that_mosquitto_pub_connects_with(gw: Running, tmp_path: Path) -> None:
    ident = await enrol_with_certificate(gw, tmp_path / "dev", "btn-101")
    cert = x509.load_pem_x509_certificate(ident.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:bosun:device:btn-101"]

    done = await run_cmd(*mosquitto_pub(gw, ident, "btn-101", "status", json.dumps({"battery": 55})))
    assert done.returncode == 0, done.stderr.decode()
    assert await gw.wait_for("SELECT 1 FROM devices WHERE device_id = 'btn-101' AND battery = 55")

    # the same certificate with another client id: refused (the device id in the SAN must be the client id)
    stolen = await run_cmd(*mosquitto_pub(gw, ident, "btn-999", "status", json.dumps({"battery": 1})))
    assert stolen.returncode != 0
    assert "not authori" in stolen.stderr.decode().lower()
    assert gw.gw.metrics.auth_failures.labels("certificate_client_id_mismatch")._value.get() == 1


async def test_a_certificate_not_from_our_ca_fails_the_handshake(gw: Running, tmp_path: Path) -> None:
    ident = await enrol_with_certificate(gw, tmp_path / "dev", "btn-1")
    # a self-signed certificate for the same device id: the listener only trusts its own CA
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "btn-1")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "btn-1")]))
        .public_key(ident.key.public_key())
        .serial_number(int(ident.serial, 16))
        .not_valid_before(x509.load_pem_x509_certificate(ident.cert_path.read_bytes()).not_valid_before_utc)
        .not_valid_after(x509.load_pem_x509_certificate(ident.cert_path.read_bytes()).not_valid_after_utc)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:bosun:device:btn-1")]), critical=False
        )
        .sign(ident.key, hashes.SHA256())
    )
    ident.cert_path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    done = await run_cmd(*mosquitto_pub(gw, ident, "btn-1", "status", "{}"))
    assert done.returncode != 0


def tls_paho(make: Callable[..., Paho], gw: Running, ident: Identity | None, client_id: str, **kwargs: Any) -> Paho:
    assert gw.gw.mqtts_port is not None
    client = make(gw.gw.mqtts_port, client_id, **kwargs)
    ca = str(ident.ca_path) if ident else str(gw.data_dir / "pki" / "ca.pem")
    if ident is not None:
        client.client.tls_set(ca_certs=ca, certfile=str(ident.cert_path), keyfile=str(ident.key_path))
    else:
        client.client.tls_set(ca_certs=ca)
    return client


async def test_a_password_device_connects_over_tls(gw: Running, paho_clients: Callable[..., Paho]) -> None:
    answer = await enrol(gw, "btn-7", None)
    client = tls_paho(paho_clients, gw, None, "btn-7", username="btn-7", password=answer["password"])
    assert await asyncio.to_thread(client.connect) == 0
    await asyncio.to_thread(client.publish, topic("btn-7", "status"), json.dumps({"battery": 70}))
    assert await gw.wait_for("SELECT 1 FROM devices WHERE device_id = 'btn-7' AND battery = 70")


async def wait_event(event: Any, timeout: float) -> bool:
    return bool(await asyncio.to_thread(event.wait, timeout))


async def test_a_revoked_device_is_cut_off_within_a_second_by_either_method(
    gw: Running, tmp_path: Path, paho_clients: Callable[..., Paho]
) -> None:
    ident = await enrol_with_certificate(gw, tmp_path / "dev", "btn-cert")
    answer = await enrol(gw, "btn-pass", None, room="c102")
    by_cert = tls_paho(paho_clients, gw, ident, "btn-cert")
    by_password = paho_clients(gw.mqtt_port, "btn-pass", "btn-pass", answer["password"])
    assert await asyncio.to_thread(by_cert.connect) == 0
    assert await asyncio.to_thread(by_password.connect) == 0

    started = time.monotonic()
    async with gw.http() as http:
        for device_id in ("btn-cert", "btn-pass"):
            r = await http.post(f"/api/v1/devices/{device_id}/revoke", json={"reason": "lost overboard"})
            assert r.status_code == 200, r.text
    assert await wait_event(by_cert.disconnected, 1.0)
    assert await wait_event(by_password.disconnected, 1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    for client in (by_cert, by_password):
        await asyncio.to_thread(client.close)

    # neither method works from now on
    again = tls_paho(paho_clients, gw, ident, "btn-cert")
    assert await asyncio.to_thread(again.connect) == 5
    password_again = paho_clients(gw.mqtt_port, "btn-pass", "btn-pass", answer["password"])
    assert await asyncio.to_thread(password_again.connect) == 5
    done = await run_cmd(*mosquitto_pub(gw, ident, "btn-cert", "status", "{}"))
    assert done.returncode != 0
    assert gw.rows("SELECT count(*) FROM device_certificates WHERE device_id = 'btn-cert' AND revoked_at IS NOT NULL")[
        0
    ] == (1,)
    assert gw.rows("SELECT target FROM audit_log WHERE action = 'device.revoke' ORDER BY id") == [
        ("btn-cert",),
        ("btn-pass",),
    ]


async def test_a_revoked_certificate_stays_refused_when_the_id_is_provisioned_again(
    gw: Running, tmp_path: Path, paho_clients: Callable[..., Paho]
) -> None:
    old = await enrol_with_certificate(gw, tmp_path / "old", "btn-1")
    async with gw.http() as http:
        assert (await http.post("/api/v1/devices/btn-1/revoke")).status_code == 200
        refused = await http.post("/api/v1/provisioning/tokens", json={"site": "yacht", "room": "c1", "type": "button"})
        r = await http.post("/api/v1/provision", json={"token": refused.json()["token"], "device_id": "btn-1"})
        assert r.status_code == 403 and "was revoked" in r.json()["message"]
        assert (await http.delete("/api/v1/devices/btn-1")).status_code == 204
    new = await enrol_with_certificate(gw, tmp_path / "new", "btn-1")
    assert new.serial != old.serial
    assert (await run_cmd(*mosquitto_pub(gw, new, "btn-1", "status", "{}"))).returncode == 0
    assert (await run_cmd(*mosquitto_pub(gw, old, "btn-1", "status", "{}"))).returncode != 0


async def test_revoking_from_the_cli_disconnects_a_running_device(
    gw: Running, tmp_path: Path, paho_clients: Callable[..., Paho]
) -> None:
    from conftest import BOSUN

    answer = await enrol(gw, "btn-cli", None)
    client = paho_clients(gw.mqtt_port, "btn-cli", "btn-cli", answer["password"])
    assert await asyncio.to_thread(client.connect) == 0
    done = await run_cmd(*BOSUN, "security", "revoke", "btn-cli", "--data-dir", str(gw.data_dir))
    assert done.returncode == 0, done.stderr.decode()
    assert await wait_event(client.disconnected, 2.5)  # the running gateway polls the registry every second


def presented_serial(port: int, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_the_live_listener_presents_a_renewed_server_certificate(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "var")
    gateway = Gateway(cfg)
    issued_at = datetime.now(UTC) - timedelta(days=61)  # the first start was 61 days ago: 29 of 90 days left
    gateway.trust._clock = lambda: issued_at
    await gateway.start()
    try:
        ca = gateway.trust.ca
        assert ca is not None and ca.server_cert is not None and gateway.mqtts_port is not None
        before = await asyncio.to_thread(presented_serial, gateway.mqtts_port, ca.ca_path)
        assert before == ca.server_cert.serial_number
        ca.clock = lambda: datetime.now(UTC)  # today: the renewal is due, nobody restarts anything
        assert ca.renewal_reason() == "it expires in 28 days"
        assert ca.renew_if_due()
        after = await asyncio.to_thread(presented_serial, gateway.mqtts_port, ca.ca_path)
        assert after == ca.server_cert.serial_number != before
        assert gateway.health()["security"]["server_renewals"] == 1
    finally:
        await gateway.stop()


async def test_healthz_and_the_ui_warn_thirty_days_before_the_ca_expires(gw: Running) -> None:
    ca = gw.gw.trust.ca
    assert ca is not None and ca.ca is not None
    async with gw.http() as http:
        assert (await http.get("/healthz")).json()["security"]["warning"] is None
        expires = ca.ca.not_after
        ca.clock = lambda: expires - timedelta(days=29, hours=1)
        warning = (await http.get("/healthz")).json()["security"]["warning"]
        assert warning.startswith(f"the gateway's CA expires on {expires:%Y-%m-%d} (29 days)")
        assert (await http.get("/api/v1/security/tls")).json()["warning"] == warning
        assert warning in (await http.get("/security")).text.replace("&#39;", "'")


async def test_mosquitto_sub_with_a_certificate_receives_its_commands(gw: Running, tmp_path: Path) -> None:
    ident = await enrol_with_certificate(gw, tmp_path / "dev", "btn-cmd")
    sub = await asyncio.create_subprocess_exec(
        require("mosquitto_sub"),
        "-h", "127.0.0.1", "-p", str(gw.gw.mqtts_port),
        "--cafile", str(ident.ca_path), "--cert", str(ident.cert_path), "--key", str(ident.key_path),
        "-i", "btn-cmd", "-q", "2", "-t", topic("btn-cmd", "cmd/#"), "-C", "1", "-v",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(100):  # subscribed once the broker holds its session
            session = gw.gw.broker.session("btn-cmd") if gw.gw.broker else None
            if session is not None and session.subscriptions:
                break
            await asyncio.sleep(0.05)
        async with gw.http() as http:
            r = await http.post("/api/v1/devices/btn-cmd/command", json={"name": "identify", "args": {"blink": 3}})
            assert r.status_code == 202, r.text
        out, err = await asyncio.wait_for(sub.communicate(), 10)
    finally:
        if sub.returncode is None:
            sub.kill()
            await sub.wait()
    line = out.decode().strip()
    assert line.startswith(topic("btn-cmd", "cmd/identify") + " "), (line, err.decode())
    assert json.loads(line.split(" ", 1)[1])["blink"] == 3


async def test_bosun_run_takes_mqtts_port_and_security_ca_prints_the_fingerprint(tmp_path: Path) -> None:
    from conftest import BOSUN, start_gateway

    data = tmp_path / "var"
    proc, _, _ = await asyncio.to_thread(start_gateway, data)
    try:
        banner: str = proc.banner  # type: ignore[attr-defined]
        assert "MQTTS  mqtts://127.0.0.1:" in banner
        port = int(banner.split("mqtts://127.0.0.1:")[1].split()[0])
        done = await run_cmd(*BOSUN, "security", "ca", "--data-dir", str(data))
        assert done.returncode == 0, done.stderr.decode()
        out = done.stdout.decode()
        pem = out[: out.index("fingerprint")]
        fingerprint = out.split("fingerprint (SHA-256): ")[1].strip()
        ca = x509.load_pem_x509_certificate(pem.encode())
        assert ca.fingerprint(hashes.SHA256()).hex() == fingerprint
        (tmp_path / "ca.pem").write_text(pem)
        presented = await asyncio.to_thread(presented_serial, port, tmp_path / "ca.pem")  # verifies against it
        assert presented > 0
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)


# -- the ACL simulator agrees with the broker ------------------------------------------------------------------

STRICT = {"actions": ["press", "status"], "max_qos": 1, "retain": False}
OWN = "bosun/yacht/c101/button/btn-1/"
OTHER = "bosun/yacht/c102/sensor/temp-2/"
CASES: list[tuple[str, str, str, int, bool]] = [
    # (who, action, topic, qos, retain)
    ("btn-1", "publish", OWN + "press", 1, False),
    ("btn-1", "publish", OWN + "telemetry", 0, False),  # not in its profile's actions
    ("btn-1", "publish", OWN + "status", 2, False),  # above its profile's max QoS
    ("btn-1", "publish", OWN + "status", 0, True),  # its profile forbids retain
    ("btn-1", "publish", OTHER + "telemetry", 0, False),  # another device's namespace
    ("btn-1", "publish", OWN + "cmd/reset", 1, False),  # never into its own cmd/
    ("temp-2", "publish", OTHER + "telemetry", 2, True),  # no profile: its namespace is enough
    ("temp-2", "publish", OWN + "press", 1, False),
    ("nodered", "publish", OTHER + "cmd/identify", 1, False),
    ("nodered", "publish", OTHER + "telemetry", 0, False),
    ("btn-1", "subscribe", OWN + "cmd/#", 2, False),  # granted at its profile's max QoS
    ("btn-1", "subscribe", OTHER + "cmd/#", 1, False),
    ("btn-1", "subscribe", "#", 0, False),
    ("temp-2", "subscribe", OTHER + "cmd/+", 1, False),
    ("nodered", "subscribe", "bosun/+/+/sensor/#", 1, False),
    ("nodered", "subscribe", "bosun/yacht/c101/#", 1, False),
]


async def test_the_acl_simulator_agrees_with_the_broker(gw: Running, paho_clients: Callable[..., Paho]) -> None:
    secrets: dict[str, str] = {}
    secrets["btn-1"] = (await enrol(gw, "btn-1", None))["password"]
    new = registry.NewDevice("temp-2", "yacht", "c102", "sensor")
    _, secrets["temp-2"] = await gw.gw.writer.run(lambda c: registry.add_device(c, new, "test"))
    for name, read, write in (("nodered", ["bosun/+/+/sensor/#"], ["bosun/+/+/+/+/cmd/#"]), ("spy", ["#"], [])):
        secrets[name] = f"{name}-password-long"
        await gw.gw.writer.run(lambda c, n=name, r=read, w=write: registry.add_integration(c, n, secrets[n], r, w, "t"))
    async with gw.http() as http:
        assert (await http.put("/api/v1/security/profiles/strict", json=STRICT)).status_code == 200
        assert (await http.put("/api/v1/devices/btn-1/profile", json={"profile": "strict"})).status_code == 200
        simulated = []
        for who, action, topic_, qos, retain in CASES:
            key = "username" if who == "nodered" else "device_id"
            body = {key: who, "action": action, "topic": topic_, "qos": qos, "retain": retain}
            r = await http.post("/api/v1/security/acl/simulate", json=body)
            assert r.status_code == 200, r.text
            simulated.append(r.json())
    await gw.gw.accounts.refresh()

    spy = paho_clients(gw.mqtt_port, "spy", "spy", secrets["spy"])
    assert await asyncio.to_thread(spy.connect) == 0
    await asyncio.to_thread(spy.subscribe, "#", 2)
    clients = {}
    for who in ("btn-1", "temp-2", "nodered"):
        clients[who] = paho_clients(gw.mqtt_port, who, who, secrets[who])
        assert await asyncio.to_thread(clients[who].connect) == 0
    sentinel = {"btn-1": OWN + "status", "temp-2": OTHER + "status", "nodered": OTHER + "cmd/ping"}

    actual = []
    for n, (who, action, topic_, qos, retain) in enumerate(CASES):
        client = clients[who]
        if action == "subscribe":
            codes = await asyncio.to_thread(client.subscribe, topic_, qos)
            actual.append((codes[0] != 0x80, codes[0]))
            continue
        spy.messages.clear()
        await asyncio.to_thread(client.publish, topic_, f"case-{n}", qos, retain)
        # a sentinel on the same connection: delivered in order, so the case arrived iff it is seen before it
        await asyncio.to_thread(client.publish, sentinel[who], f"sentinel-{n}", 1)
        for _ in range(250):
            if any(m.payload == f"sentinel-{n}".encode() for m in spy.messages):
                break
            await asyncio.sleep(0.02)
        seen = [m.payload for m in spy.messages]
        assert f"sentinel-{n}".encode() in seen, (who, topic_)
        actual.append((f"case-{n}".encode() in seen, None))

    for case, sim, (allowed, code) in zip(CASES, simulated, actual, strict=True):
        assert sim["allowed"] == allowed, (case, sim)
        if code is not None and allowed:
            expected_qos = min(case[3], STRICT["max_qos"]) if case[0] == "btn-1" else case[3]
            assert code == expected_qos, (case, code)
    rules = {(c[0], c[2], c[3], c[4]): s["rule"] for c, s in zip(CASES, simulated, strict=True)}
    assert "allows publishing only press, status" in rules[("btn-1", OWN + "telemetry", 0, False)]
    assert "QoS 1 at most" in rules[("btn-1", OWN + "status", 2, False)]
    assert "retained" in rules[("btn-1", OWN + "status", 0, True)]
    assert "devices publish only under" in rules[("btn-1", OTHER + "telemetry", 0, False)]
