"""Provisioning: single-use tokens (QR codes) and device enrolment, entirely on the LAN.

An installer creates a token scoped to a site, room and device type (optionally bound to one pending device
and a security profile); only its SHA-256 is stored. The device, or the phone that scanned the QR code,
calls `POST /api/v1/provision` with the token and its id or MAC, and either nothing (it gets a generated MQTT
password, returned once) or a CSR (it gets a client certificate from the gateway's CA). Consuming the token,
registering the device and recording its certificate happen in one transaction: a token provisions exactly
one device, and a replay finds it used. Every attempt, refused or not, is in the audit log.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import segno
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import pki
from gateway.errors import Conflict, Forbidden, NotFound, RegistryError
from gateway.store import registry
from gateway.store.records import audit
from gateway.topics import valid_segment

__all__ = [
    "Enrolled",
    "Enrolment",
    "IssuedToken",
    "RateLimiter",
    "create_token",
    "delete_token",
    "device_id_for_mac",
    "enrol",
    "list_tokens",
    "qr_payload",
    "qr_svg",
    "revoke_device",
]

_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-]?[0-9A-Fa-f]{2}){5}$")
QR_VERSION = "2.0"  # seed 004's generateProvisioningQR


@dataclass(frozen=True)
class IssuedToken:
    """A token as created: `token` is the secret, shown once (QR code); `token_id` names it afterwards."""

    token: str
    token_id: str
    site: str
    room: str
    type: str
    device_id: str | None
    profile: str | None
    expires_at: float


@dataclass(frozen=True)
class Enrolment:
    """What a device sends to POST /api/v1/provision."""

    token: str
    device_id: str | None = None
    mac: str | None = None
    csr: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    site: str
    room: str
    type: str
    profile: str | None
    username: str
    password: str | None  # None when the device enrolled with a CSR
    certificate: str | None
    serial: str | None
    token_id: str


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def device_id_for_mac(mac: str, type_: str) -> str:
    """The device id a device that sends only its MAC gets: `<type>-<mac hex>`."""
    if not _MAC.fullmatch(mac):
        raise RegistryError(f"mac: expected six hex bytes like a4:cf:12:00:00:01, got {mac!r}")
    return f"{type_}-{re.sub(r'[^0-9a-f]', '', mac.lower())}"


def create_token(
    conn: sqlite3.Connection,
    site: str,
    room: str,
    type_: str,
    ttl_s: float,
    actor: str,
    device_id: str | None = None,
    profile: str | None = None,
    now: float | None = None,
) -> IssuedToken:
    for label, value in (("site", site), ("room", room), ("type", type_)):
        if not valid_segment(value or ""):
            raise RegistryError(f"{label} {value!r} must be 1-64 characters of [A-Za-z0-9_-] (it is a topic level)")
    if type_ not in registry.DEVICE_TYPES:
        raise RegistryError(f"type {type_!r} must be one of {', '.join(registry.DEVICE_TYPES)}")
    if device_id is not None and not valid_segment(device_id):
        raise RegistryError(f"device_id {device_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
    if (
        profile is not None
        and not conn.execute("SELECT 1 FROM security_profiles WHERE name = ?", (profile,)).fetchone()
    ):
        raise NotFound(f"security profile {profile} does not exist")
    if ttl_s <= 0:
        raise RegistryError("a token needs a positive lifetime")
    now = time.time() if now is None else now
    token = secrets.token_urlsafe(24)
    token_id = f"pt-{secrets.token_hex(4)}"
    expires = now + ttl_s
    conn.execute(
        "INSERT INTO provisioning_tokens(token_hash, token_id, site, room, type, device_id, profile, created_by, "
        "created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (_hash(token), token_id, site, room, type_, device_id, profile, actor, now, expires),
    )
    audit(
        conn,
        actor,
        "provision.token",
        token_id,
        {"site": site, "room": room, "type": type_, "device_id": device_id, "expires_at": expires},
    )
    return IssuedToken(token, token_id, site, room, type_, device_id, profile, expires)


_TOKEN_COLUMNS = "token_id, site, room, type, device_id, profile, created_by, created_at, expires_at, used_at, used_by"


def list_tokens(conn: sqlite3.Connection, include_used: bool = False, now: float | None = None) -> list[dict[str, Any]]:
    """Tokens (never their secrets), newest first; by default only the ones still usable."""
    now = time.time() if now is None else now
    where = "" if include_used else " WHERE used_at IS NULL AND expires_at > ?"
    params: tuple[Any, ...] = () if include_used else (now,)
    rows = conn.execute(f"SELECT {_TOKEN_COLUMNS} FROM provisioning_tokens{where} ORDER BY created_at DESC", params)
    out = []
    for row in rows:
        item = dict(zip(_TOKEN_COLUMNS.split(", "), row, strict=True))
        item["state"] = "used" if item["used_at"] else ("expired" if item["expires_at"] <= now else "open")
        out.append(item)
    return out


def delete_token(conn: sqlite3.Connection, token_id: str, actor: str) -> None:
    if conn.execute("DELETE FROM provisioning_tokens WHERE token_id = ?", (token_id,)).rowcount == 0:
        raise NotFound(f"provisioning token {token_id} does not exist")
    audit(conn, actor, "provision.token_deleted", token_id, {})


def qr_payload(
    token: IssuedToken, broker_url: str, ca_fingerprint: str | None, provision_url: str, profile: str | None
) -> dict[str, Any]:
    """Seed 004's ProvisioningPayload (version, protocol, token, site, room, deviceType, mqttBrokerUrl,
    securityProfile, certificateDownloadUrl, configurationHash) plus the CA fingerprint to pin and where to
    POST. configurationHash is the SHA-256 of the other fields (canonical JSON), so a device can tell a
    damaged scan from a good one."""
    body: dict[str, Any] = {
        "version": QR_VERSION,
        "protocol": "mqtt",
        "token": token.token,
        "site": token.site,
        "room": token.room,
        "deviceType": token.type,
        "mqttBrokerUrl": broker_url,
        "securityProfile": profile or token.profile or token.type,
        "provisionUrl": provision_url,
    }
    if ca_fingerprint:
        body["caFingerprint"] = ca_fingerprint
        body["certificateDownloadUrl"] = provision_url.replace("/provision", "/provisioning/ca.pem")
    if token.device_id:
        body["deviceId"] = token.device_id
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    body["configurationHash"] = hashlib.sha256(canonical.encode()).hexdigest()
    return body


def qr_svg(payload: dict[str, Any], scale: int = 4) -> str:
    """The payload as a QR code in SVG (segno: no image library, renders offline in any browser)."""
    data = json.dumps(payload, separators=(",", ":"))
    qr = segno.make(data, error="m", micro=False)
    svg: str = qr.svg_inline(scale=scale, dark="#000", light="#fff")
    return svg


def enrol(
    conn: sqlite3.Connection,
    request: Enrolment,
    address: str,
    sign: Callable[[str, str], x509.Certificate] | None,
    now: float | None = None,
) -> Enrolled:
    """Consume the token and register the device, in the caller's transaction; raises when refused.

    `sign(csr_pem, device_id)` is the CA (None when TLS is off: then a CSR is refused).
    """
    now = time.time() if now is None else now
    row = conn.execute(
        "SELECT token_id, site, room, type, device_id, profile, expires_at, used_at, used_by "
        "FROM provisioning_tokens WHERE token_hash = ?",
        (_hash(request.token or ""),),
    ).fetchone()
    if row is None:
        raise Forbidden("unknown provisioning token (check the QR code, or create a new token)")
    token_id, site, room, type_, bound, profile, expires_at, used_at, used_by = row
    if used_at is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(used_at))
        raise Conflict(f"provisioning token {token_id} was already used at {when} UTC (by {used_by}): create a new one")
    if expires_at <= now:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(expires_at))
        raise Forbidden(f"provisioning token {token_id} expired at {when} UTC: create a new one")
    if request.device_id:
        device_id = request.device_id
    elif request.mac:
        device_id = device_id_for_mac(request.mac, type_)
    elif bound:
        device_id = bound
    else:
        raise RegistryError("send device_id or mac")
    if not valid_segment(device_id):
        raise RegistryError(f"device_id {device_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
    if bound and device_id != bound:
        raise Forbidden(f"provisioning token {token_id} is for device {bound}, not {device_id}")
    if conn.execute(
        "SELECT 1 FROM revocations r JOIN devices d ON d.device_id = r.device_id WHERE r.device_id = ?", (device_id,)
    ).fetchone():
        raise Forbidden(f"device {device_id} was revoked: delete it before provisioning it again")
    if request.csr is not None and sign is None:
        raise RegistryError("TLS is off on this gateway ([tls] port = -1): provision without a CSR")
    # single use, atomically: only the first transaction to get here marks it used
    claimed = conn.execute(
        "UPDATE provisioning_tokens SET used_at = ?, used_by = ? WHERE token_hash = ? AND used_at IS NULL",
        (now, device_id, _hash(request.token)),
    ).rowcount
    if claimed != 1:
        raise Conflict(f"provisioning token {token_id} was already used: create a new one")
    actor = f"provision:{token_id}"
    # deleted after a revocation: a fresh start (its old certificates stay revoked in device_certificates)
    conn.execute("DELETE FROM revocations WHERE device_id = ?", (device_id,))
    new = registry.NewDevice(device_id, site, room, type_, None, request.name)
    _, secret = registry.add_device(conn, new, actor)
    password: str | None = secret
    if profile is None and conn.execute("SELECT 1 FROM security_profiles WHERE name = ?", (type_,)).fetchone():
        profile = type_  # a profile named after the device type is its default
    if profile is not None:
        conn.execute("UPDATE devices SET profile = ? WHERE device_id = ?", (profile, device_id))
    certificate = serial = None
    if request.csr is not None:
        assert sign is not None
        cert = sign(request.csr, device_id)
        serial = pki.serial_hex(cert.serial_number)
        certificate = cert.public_bytes(serialization.Encoding.PEM).decode()
        conn.execute(
            "INSERT INTO device_certificates(serial, device_id, fingerprint, issued_at, not_after) VALUES (?,?,?,?,?)",
            (serial, device_id, pki.fingerprint(cert), now, cert.not_valid_after_utc.timestamp()),
        )
        password = None  # the generated secret is never shown: this device logs in with its certificate
    audit(
        conn,
        f"address:{address}",
        "provision.enrolled",
        device_id,
        {"token_id": token_id, "site": site, "room": room, "type": type_, "mac": request.mac, "certificate": serial},
    )
    return Enrolled(device_id, site, room, type_, profile, device_id, password, certificate, serial, token_id)


def audit_refusal(conn: sqlite3.Connection, request: Enrolment, address: str, reason: str) -> None:
    """A refused attempt, in a transaction of its own (the attempt's own was rolled back)."""
    token_id = None
    row = conn.execute(
        "SELECT token_id FROM provisioning_tokens WHERE token_hash = ?", (_hash(request.token or ""),)
    ).fetchone()
    if row is not None:
        token_id = row[0]
    audit(
        conn,
        f"address:{address}",
        "provision.refused",
        request.device_id or request.mac,
        {"token_id": token_id, "reason": reason},
    )


def revoke_device(conn: sqlite3.Connection, device_id: str, actor: str, reason: str | None = None) -> dict[str, Any]:
    """Refuse a device from now on: its password is deleted, its certificates revoked, the device disabled.

    Deleting the credential makes the broker drop its session at once (the registry version changes) and
    refuse its password; the revoked certificates stay refused even if the id is provisioned again later.
    """
    registry.get_device(conn, device_id)  # NotFound if unknown
    if conn.execute("SELECT 1 FROM revocations WHERE device_id = ?", (device_id,)).fetchone():
        raise Conflict(f"device {device_id} is already revoked")
    now = time.time()
    conn.execute(
        "INSERT INTO revocations(device_id, revoked_at, revoked_by, reason) VALUES (?,?,?,?)",
        (device_id, now, actor, reason),
    )
    certs = conn.execute(
        "UPDATE device_certificates SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL", (now, device_id)
    ).rowcount
    conn.execute("DELETE FROM credentials WHERE username = ? AND kind = 'device'", (device_id,))
    conn.execute("UPDATE devices SET disabled = 1, updated_at = ? WHERE device_id = ?", (now, device_id))
    audit(conn, actor, "device.revoke", device_id, {"reason": reason, "certificates": certs})
    return {"device_id": device_id, "revoked_at": now, "certificates_revoked": certs}


def certificates(conn: sqlite3.Connection, device_id: str | None = None) -> list[dict[str, Any]]:
    where, params = ("WHERE device_id = ?", (device_id,)) if device_id else ("", ())
    rows = conn.execute(
        f"SELECT serial, device_id, fingerprint, issued_at, not_after, revoked_at FROM device_certificates {where} "
        "ORDER BY issued_at DESC",
        params,
    )
    keys = ("serial", "device_id", "fingerprint", "issued_at", "not_after", "revoked_at")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def valid_certificates(conn: sqlite3.Connection) -> dict[str, str]:
    """serial -> device id of every certificate the broker may accept (issued by us, not revoked)."""
    return dict(conn.execute("SELECT serial, device_id FROM device_certificates WHERE revoked_at IS NULL").fetchall())


class RateLimiter:
    """Provisioning attempts per client address in a sliding window (in memory; a restart forgets it)."""

    def __init__(self, per_window: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = per_window
        self._window = window_s
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}
        self._limited: set[str] = set()
        self.refused = 0

    def check(self, address: str) -> tuple[int, bool]:
        """(0, False) if an attempt from `address` may go ahead now (it is counted); else (seconds to wait,
        whether this is the first refusal since its last allowed attempt: audit that one, not a flood)."""
        now = self._clock()
        times = self._seen.setdefault(address, deque())
        while times and times[0] <= now - self._window:
            times.popleft()
        if len(self._seen) > 10_000:  # forget idle addresses so a scan cannot grow memory
            self._seen = {k: v for k, v in self._seen.items() if v}
            self._seen.setdefault(address, times)
        if len(times) >= self._limit:
            self.refused += 1
            first = address not in self._limited
            self._limited.add(address)
            return int(times[0] + self._window - now) + 1, first
        self._limited.discard(address)
        times.append(now)
        return 0, False


def enrolled_body(result: Enrolled, broker: dict[str, Any], ca_pem: str | None) -> dict[str, Any]:
    """The provision response: credentials or certificate, the CA to trust, and where the broker is."""
    body = asdict(result)
    body["client_id"] = result.device_id
    body["ca_certificate"] = ca_pem
    body["broker"] = broker["url"]
    body["brokers"] = broker
    return body
