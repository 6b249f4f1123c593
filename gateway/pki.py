"""The gateway's own certificate authority, as pure functions: keys, certificates and CSRs in, PEM out, no I/O.

Nothing here reaches a clock or a file: `now` is always given (tests move it), and gateway/tls.py owns the
files and the TLS listener's context. Keys are ECDSA P-256 (fast on a Raspberry Pi and on an ESP32's mbedTLS).
A device certificate names its device twice: CN = device id, and a URI SAN `urn:bosun:device:<id>` that the
broker compares with the MQTT client id.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import RegistryError

__all__ = [
    "DEVICE_URI",
    "CertificateAuthority",
    "create_ca",
    "device_id_of",
    "fingerprint",
    "issue_server",
    "key_pem",
    "load_ca",
    "new_key",
    "peer_device_id",
    "peer_serial",
    "serial_hex",
    "sign_csr",
]

DEVICE_URI = "urn:bosun:device:"
PrivateKey = ec.EllipticCurvePrivateKey


class CertificateAuthority:
    """A CA key and its certificate, in memory."""

    def __init__(self, key: PrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex: what a device pins from the QR code or the TXT record."""
    return cert.fingerprint(hashes.SHA256()).hex()


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def _name(common_name: str, organization: str = "Bosun") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_ca(gateway_id: str, now: datetime, days: int) -> CertificateAuthority:
    """A self-signed CA for this gateway (path length 0: it signs only leaf certificates)."""
    key = new_key()
    name = _name(f"Bosun gateway {gateway_id} CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key, cert)


def load_ca(key_bytes: bytes, cert_bytes: bytes) -> CertificateAuthority:
    key = serialization.load_pem_private_key(key_bytes, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    return CertificateAuthority(key, x509.load_pem_x509_certificate(cert_bytes))


def _leaf(
    ca: CertificateAuthority,
    subject: x509.Name,
    public_key: Any,
    san: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    now: datetime,
    days: int,
) -> x509.Certificate:
    not_after = min(now + timedelta(days=days), ca.not_after)  # never outlive the CA that vouches for it
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


def issue_server(
    ca: CertificateAuthority, hostnames: Iterable[str], addresses: Iterable[str], now: datetime, days: int
) -> tuple[PrivateKey, x509.Certificate]:
    """The broker's TLS certificate, valid for every name and address devices may use to reach it."""
    key = new_key()
    names = sorted(set(hostnames))
    ips = sorted({ipaddress.ip_address(a) for a in addresses}, key=lambda ip: (ip.version, int(ip)))
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ip) for ip in ips]
    subject = _name(names[0] if names else "bosun")
    return key, _leaf(ca, subject, key.public_key(), san, ExtendedKeyUsageOID.SERVER_AUTH, now, days)


def server_names(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses) a server certificate covers."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def sign_csr(
    ca: CertificateAuthority, csr_pem: str | bytes, device_id: str, now: datetime, days: int
) -> x509.Certificate:
    """A client certificate for `device_id` from the device's CSR.

    Only the CSR's public key is used (after checking the CSR is signed by its private key, so the device holds
    it); the subject and SAN are ours, so a device cannot ask for another device's identity.
    """
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise RegistryError(
            "csr: expected a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)"
        ) from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError):
        valid = False
    if not valid:
        raise RegistryError("csr: its signature does not match its public key")
    public_key = csr.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise RegistryError(f"csr: an RSA key needs at least 2048 bits, got {public_key.key_size}")
    elif not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise RegistryError("csr: expected an EC (P-256) or RSA public key")
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(DEVICE_URI + device_id)]
    return _leaf(ca, _name(device_id), public_key, san, ExtendedKeyUsageOID.CLIENT_AUTH, now, days)


def device_id_of(cert: x509.Certificate) -> str | None:
    """The device id a client certificate names in its SAN (None if it names none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(DEVICE_URI):
            return uri[len(DEVICE_URI) :]
    return None


def peer_device_id(peercert: dict[str, Any] | None) -> str | None:
    """The device id in a verified peer certificate as `ssl.SSLSocket.getpeercert()` returns it."""
    if not peercert:
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI" and isinstance(value, str) and value.startswith(DEVICE_URI):
            return value[len(DEVICE_URI) :]
    return None


def peer_serial(peercert: dict[str, Any] | None) -> str | None:
    """The serial of a verified peer certificate, in our form (lowercase hex without leading zeros)."""
    if not peercert or "serialNumber" not in peercert:
        return None
    try:
        return serial_hex(int(str(peercert["serialNumber"]), 16))
    except ValueError:
        return None
