"""The local CA on disk and the TLS listener's context: created on the first start, renewed without anyone.

Files live in `<data_dir>/pki/` (0700): `ca.key` (0600) and `ca.pem`, what devices trust; `server.pem`
(0600) holds the broker's certificate, the CA and their key in one file, replaced atomically so a crash
mid-renewal never pairs a certificate with the wrong key. The server certificate covers the
host name, `<host>.local`, localhost, the host's addresses and `[tls] hostnames`; it is re-issued when fewer
than `renew_days` remain or when those names change (a new DHCP address), and the running listener's
context loads it at once, so new connections get it without a restart. The CA itself lives ten years by
default (Azure IoT Edge's 90-day edge CA took vessels offline); 30 days before it expires the UI and
/healthz warn.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import ifaddr
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import pki
from gateway.config import TlsSection

__all__ = ["LocalCA", "host_addresses", "host_names"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def host_names(extra: list[str]) -> set[str]:
    host = socket.gethostname().split(".")[0] or "bosun"
    names = {"localhost", host, f"{host}.local"}
    return names | {n for n in extra if not _is_ip(n)}


def _is_ip(value: str) -> bool:
    try:
        import ipaddress

        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def host_addresses(extra: list[str]) -> set[str]:
    """Every IPv4 address of this host (plus loopback and configured ones): what devices may dial."""
    found = {"127.0.0.1", *(n for n in extra if _is_ip(n))}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and isinstance(ip.ip, str):
                found.add(ip.ip)
    return found


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically with 0600 from the first byte (never briefly world-readable)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class LocalCA:
    """The gateway's CA and server certificate in `<data_dir>/pki`, and the listener's SSL context."""

    def __init__(self, data_dir: Path, cfg: TlsSection, gateway_id: str, clock: Clock = utcnow) -> None:
        self.dir = data_dir / "pki"
        self.cfg = cfg
        self.gateway_id = gateway_id
        self.clock = clock
        self.ca: pki.CertificateAuthority | None = None
        self.server_cert: x509.Certificate | None = None
        self.context: ssl.SSLContext | None = None
        self.renewals = 0
        self._task: asyncio.Task[None] | None = None

    # -- files ---------------------------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.dir / "server.pem"

    def load_or_create(self) -> None:
        """Load the CA (creating it on the very first start) and make sure the server certificate is current."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        key_path = self.dir / "ca.key"
        if key_path.exists() and self.ca_path.exists():
            self.ca = pki.load_ca(key_path.read_bytes(), self.ca_path.read_bytes())
        else:
            self.ca = pki.create_ca(self.gateway_id, self.clock(), self.cfg.ca_days)
            _write_private(key_path, pki.key_pem(self.ca.key))
            _write_public(self.ca_path, self.ca.cert_pem)
            log.info(
                "created the gateway's CA (fingerprint %s, valid until %s)", self.ca.fingerprint, self.ca.not_after
            )
        if self.server_cert_path.exists():
            self.server_cert = x509.load_pem_x509_certificate(self.server_cert_path.read_bytes())
        self.renew_if_due()

    @property
    def fingerprint(self) -> str:
        assert self.ca is not None
        return self.ca.fingerprint

    @property
    def ca_pem(self) -> str:
        assert self.ca is not None
        return self.ca.cert_pem.decode()

    # -- the server certificate ----------------------------------------------------------------------------

    def _wanted(self) -> tuple[set[str], set[str]]:
        return host_names(self.cfg.hostnames), host_addresses(self.cfg.hostnames)

    def renewal_reason(self) -> str | None:
        """Why the server certificate must be (re)issued now, or None."""
        cert = self.server_cert
        if cert is None:
            return "no server certificate yet"
        assert self.ca is not None
        if cert.issuer != self.ca.cert.subject:
            return "issued by another CA"
        left = cert.not_valid_after_utc - self.clock()
        if left < timedelta(days=self.cfg.renew_days):
            return f"it expires in {left.days} days"
        names, addresses = pki.server_names(cert)
        wanted_names, wanted_addresses = self._wanted()
        if not (wanted_names <= names and wanted_addresses <= addresses):
            return "the host's names or addresses changed"
        return None

    def renew_if_due(self) -> bool:
        """Issue a new server certificate when due; the live listener picks it up for new connections."""
        reason = self.renewal_reason()
        if reason is None:
            return False
        assert self.ca is not None
        names, addresses = self._wanted()
        key, cert = pki.issue_server(self.ca, names, addresses, self.clock(), self.cfg.server_days)
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.ca.cert_pem
        _write_private(self.server_cert_path, chain + pki.key_pem(key))
        if self.server_cert is not None:
            self.renewals += 1
        self.server_cert = cert
        if self.context is not None:
            # load_cert_chain on the live context: handshakes from now on present the new certificate
            self.context.load_cert_chain(self.server_cert_path)
        log.info("issued the server certificate (%s), valid until %s", reason, cert.not_valid_after_utc)
        return True

    def server_context(self) -> ssl.SSLContext:
        """The TLS listener's context: our server certificate; client certificates optional, from our CA only."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.server_cert_path)
        ctx.load_verify_locations(cafile=str(self.ca_path))
        ctx.verify_mode = ssl.CERT_OPTIONAL  # a device may log in with a password instead
        self.context = ctx
        return ctx

    # -- warnings and the renewal loop ---------------------------------------------------------------------

    def ca_warning(self) -> str | None:
        """A warning for the UI and /healthz when the CA expires within `ca_warn_days`."""
        if self.ca is None:
            return None
        left = self.ca.not_after - self.clock()
        if left < timedelta(days=self.cfg.ca_warn_days):
            when = self.ca.not_after.strftime("%Y-%m-%d")
            return (
                f"the gateway's CA expires on {when} ({max(left.days, 0)} days): devices with certificates will "
                "be refused after that; plan a re-provisioning"
            )
        return None

    def status(self) -> dict[str, object]:
        assert self.ca is not None and self.server_cert is not None
        return {
            "ca_fingerprint": self.ca.fingerprint,
            "ca_not_after": self.ca.not_after.isoformat(),
            "server_not_after": self.server_cert.not_valid_after_utc.isoformat(),
            "server_renewals": self.renewals,
            "warning": self.ca_warning(),
        }

    def sign(self, csr_pem: str, device_id: str) -> x509.Certificate:
        assert self.ca is not None
        return pki.sign_csr(self.ca, csr_pem, device_id, self.clock(), self.cfg.device_days)

    async def start(self, check_s: float = 3600.0) -> None:
        self._task = asyncio.create_task(self._watch(check_s), name="bosun-tls-renewal")

    async def _watch(self, check_s: float) -> None:
        while True:
            await asyncio.sleep(check_s)
            try:
                self.renew_if_due()
            except (OSError, ValueError):
                log.exception("server certificate renewal failed; the current one stays in use")
            warning = self.ca_warning()
            if warning:
                log.warning("%s", warning)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
