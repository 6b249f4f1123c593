"""Mutual TLS: `bosun hq --tls-cert --tls-key --client-ca` takes batches only from a gateway that shows a
certificate its CA signed (`[uplink] client_cert`, `client_key`, `ca_file`), besides the gateway's token."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_hq import Hq
from test_uplink import hq_rows, started, until

from gateway.runtime import Gateway

__all__ = ["started"]  # the fixture, shared with test_uplink


def _cert(
    directory: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


async def test_mutual_tls_drains_with_a_client_certificate_and_refuses_without(
    tmp_path: Path, started: Callable[..., Any]
) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = _cert(pki, "ca", None, server=False)
    _cert(pki, "hq", ca, server=True)
    _cert(pki, "gw", ca, server=False)
    hq = Hq(
        tmp_path / "hq", 0, "--tls-cert", str(pki / "hq.pem"), "--tls-key", str(pki / "hq.key"),
        "--client-ca", str(pki / "ca.pem"),
    ).start()  # fmt: skip
    try:
        assert hq.url.startswith("https://")
        token = hq.add_gateway("gw-test")
        tls = {"uplink.url": hq.url, "uplink.token": token, "uplink.ca_file": str(pki / "ca.pem")}
        without: Gateway = await started(tmp_path / "no-cert", **tls)
        await until(lambda: without.uplink.last_error, 10, "a refused handshake")
        assert "HQ unreachable" in (without.uplink.last_error or "") and not without.uplink.connected
        with_cert: Gateway = await started(
            tmp_path / "var",
            **tls,
            **{"uplink.client_cert": str(pki / "gw.pem"), "uplink.client_key": str(pki / "gw.key")},
        )

        # the admin user's audit row (HQ's read API wants a client certificate too: its database is read directly)
        await until(lambda: with_cert.uplink.last_success, 10, "a batch confirmed over mutual TLS")
        assert hq_rows(hq, "SELECT count(*) FROM records")[0][0] >= 1 and with_cert.uplink.connected
    finally:
        hq.stop()
