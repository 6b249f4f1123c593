"""The local CA: certificates and CSRs (pure), files and permissions, renewal and the CA warning (clock injected)."""

from __future__ import annotations

import asyncio
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import config, pki
from gateway.errors import RegistryError
from gateway.tls import LocalCA

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def make_csr(common_name: str = "anything", key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:bosun:device:someone-else")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_device_certificate_names_the_device_not_what_the_csr_asked_for() -> None:
    ca = pki.create_ca("gw-1", NOW, 3650)
    cert = pki.sign_csr(ca, make_csr("admin"), "btn-101", NOW, 365)
    assert pki.device_id_of(cert) == "btn-101"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "btn-101"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca.cert)
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)


def test_a_device_certificate_never_outlives_its_ca() -> None:
    ca = pki.create_ca("gw-1", NOW, 30)
    cert = pki.sign_csr(ca, make_csr(), "btn-1", NOW, 3650)
    assert cert.not_valid_after_utc == ca.not_after


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        ("not a csr", "expected a PEM certificate signing request"),
        (make_csr(key=rsa.generate_private_key(65537, 1024)), "at least 2048 bits"),
    ],
)
def test_bad_csrs_are_refused_with_a_reason(csr: str, message: str) -> None:
    ca = pki.create_ca("gw-1", NOW, 3650)
    with pytest.raises(RegistryError, match=message):
        pki.sign_csr(ca, csr, "btn-1", NOW, 365)


def test_a_csr_whose_signature_does_not_match_is_refused() -> None:
    good = x509.load_pem_x509_csr(make_csr().encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0xFF  # flip bits in the signature
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(RegistryError, match="signature"):
        pki.sign_csr(pki.create_ca("gw-1", NOW, 3650), pem, "btn-1", NOW, 365)


def test_server_certificate_covers_names_and_addresses() -> None:
    ca = pki.create_ca("gw-1", NOW, 3650)
    _, cert = pki.issue_server(ca, ["localhost", "boat.local"], ["127.0.0.1", "192.168.1.5"], NOW, 90)
    names, addresses = pki.server_names(cert)
    assert names == {"localhost", "boat.local"}
    assert addresses == {"127.0.0.1", "192.168.1.5"}


def test_peer_certificate_helpers_read_what_ssl_reports() -> None:
    peer = {"subjectAltName": (("URI", "urn:bosun:device:btn-1"),), "serialNumber": "00AB12"}
    assert pki.peer_device_id(peer) == "btn-1"
    assert pki.peer_serial(peer) == "ab12"
    assert pki.peer_device_id({"subjectAltName": (("DNS", "btn-1"),)}) is None
    assert pki.peer_device_id(None) is None


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def tls_section(**changes: object) -> config.TlsSection:
    return config.TlsSection(**changes)  # type: ignore[arg-type]


def test_first_start_creates_the_ca_with_private_files(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path, tls_section(), "gw-1", Clock(NOW))
    ca.load_or_create()
    for name in ("ca.key", "server.pem"):
        mode = stat.S_IMODE((tmp_path / "pki" / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    again = LocalCA(tmp_path, tls_section(), "gw-1", Clock(NOW + timedelta(days=1)))
    again.load_or_create()
    assert again.fingerprint == ca.fingerprint  # the CA is created once and kept
    assert again.renewals == 0 and again.server_cert == ca.server_cert  # nothing was due


def test_server_certificate_is_renewed_before_expiry_and_the_live_context_loads_it(tmp_path: Path) -> None:
    clock = Clock(NOW)
    ca = LocalCA(tmp_path, tls_section(server_days=90, renew_days=30), "gw-1", clock)
    ca.load_or_create()
    ca.server_context()
    first = ca.server_cert
    assert first is not None
    clock.now = NOW + timedelta(days=59)
    assert not ca.renew_if_due()
    clock.now = NOW + timedelta(days=61)  # 29 days left
    assert ca.renewal_reason() == "it expires in 29 days"
    assert ca.renew_if_due()
    assert ca.server_cert is not None and ca.server_cert.serial_number != first.serial_number
    assert ca.server_cert.not_valid_after_utc == clock.now + timedelta(days=90)
    assert ca.renewals == 1
    on_disk = x509.load_pem_x509_certificate((tmp_path / "pki" / "server.pem").read_bytes())
    assert on_disk.serial_number == ca.server_cert.serial_number


def test_the_ca_warns_thirty_days_before_it_expires(tmp_path: Path) -> None:
    clock = Clock(NOW)
    ca = LocalCA(tmp_path, tls_section(ca_days=400), "gw-1", clock)
    ca.load_or_create()
    assert ca.ca_warning() is None
    clock.now = NOW + timedelta(days=371)
    warning = ca.ca_warning()
    assert warning is not None and "29 days" in warning and "expires on 2027-02-05" in warning
    assert ca.status()["warning"] == warning


async def test_the_renewal_loop_renews_without_anyone(tmp_path: Path) -> None:
    clock = Clock(NOW)
    ca = LocalCA(tmp_path, tls_section(), "gw-1", clock)
    ca.load_or_create()
    await ca.start(check_s=0.02)
    try:
        clock.now = NOW + timedelta(days=75)
        for _ in range(250):
            if ca.renewals:
                break
            await asyncio.sleep(0.02)
        assert ca.renewals == 1
        assert ca.server_cert is not None and ca.server_cert.not_valid_after_utc == clock.now + timedelta(days=90)
    finally:
        await ca.stop()
