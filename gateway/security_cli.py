"""`bosun security ...`: provisioning tokens and QR codes, revocation, the CA (works while the gateway runs)."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

import click

from gateway import pki, provisioning
from gateway.config import Config

__all__ = ["security"]


def _cli() -> Any:
    from gateway import cli  # at call time: cli registers this group, so it is fully imported by then

    return cli


def _ca_fingerprint(cfg: Config) -> str | None:
    path = cfg.data_dir / "pki" / "ca.pem"
    if not path.exists():
        return None
    from cryptography import x509

    return pki.fingerprint(x509.load_pem_x509_certificate(path.read_bytes()))


def _broker_url(cfg: Config) -> str:
    host = cfg.provisioning.broker_host or f"{socket.gethostname().split('.')[0]}.local"
    return f"mqtts://{host}:{cfg.tls.port}" if cfg.tls.port > 0 else f"mqtt://{host}:{cfg.mqtt.port}"


def _http_base(cfg: Config) -> str:
    host = cfg.provisioning.broker_host or f"{socket.gethostname().split('.')[0]}.local"
    return f"http://{host}:{cfg.http.port}"


@click.group()
def security() -> None:
    """Provisioning tokens (QR codes), device revocation and the gateway's CA."""


def _common(fn: Any) -> Any:
    fn = click.option("--data-dir", type=click.Path(file_okay=False), help="Data directory (overrides the config).")(fn)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")(fn)


@security.command("token")
@_common
@click.option("--site", required=True)
@click.option("--room", required=True)
@click.option("--type", "type_", required=True, type=click.Choice(["button", "watch", "repeater", "sensor"]))
@click.option("--device-id", help="Bind the token to this device id.")
@click.option("--profile", help="Security profile the device gets.")
@click.option("--hours", type=float, help="Lifetime (default: [provisioning] token_hours).")
@click.option("--svg", "svg_path", type=click.Path(dir_okay=False), help="Also write the QR code as SVG here.")
def token(
    config_path: str | None,
    data_dir: str | None,
    site: str,
    room: str,
    type_: str,
    device_id: str | None,
    profile: str | None,
    hours: float | None,
    svg_path: str | None,
) -> None:
    """Create a single-use provisioning token; print it and its QR payload (JSON) once."""
    cli = _cli()
    cfg = cli._load(config_path, data_dir=data_dir)
    ttl = (hours if hours is not None else cfg.provisioning.token_hours) * 3600.0
    if ttl <= 0:
        raise click.ClickException("--hours must be positive")

    def make(conn: sqlite3.Connection) -> provisioning.IssuedToken:
        return provisioning.create_token(conn, site, room, type_, ttl, "cli", device_id=device_id, profile=profile)

    issued = cli._db(cfg, make)
    payload = provisioning.qr_payload(
        issued, _broker_url(cfg), _ca_fingerprint(cfg), f"{_http_base(cfg)}/api/v1/provision", profile
    )
    if svg_path:
        Path(svg_path).write_text(provisioning.qr_svg(payload), encoding="utf-8")
    click.echo(f"token {issued.token_id} for {site}/{room} ({type_}), single use, shown once:")
    click.echo(f"  {issued.token}")
    click.echo(json.dumps(payload, indent=2))


@security.command("tokens")
@_common
@click.option("--all", "all_", is_flag=True, help="Include used and expired tokens.")
def tokens(config_path: str | None, data_dir: str | None, all_: bool) -> None:
    """List provisioning tokens (never their secrets)."""
    cli = _cli()
    cfg = cli._load(config_path, data_dir=data_dir)
    rows = cli._db(cfg, lambda c: provisioning.list_tokens(c, include_used=all_), write=False)
    for row in rows:
        click.echo(
            f"{row['token_id']}  {row['site']}/{row['room']}  {row['type']}  {row['state']}  {row['used_by'] or ''}"
        )


@security.command("revoke")
@_common
@click.argument("device_id")
@click.option("--reason", help="Why (kept in the audit log).")
def revoke(config_path: str | None, data_dir: str | None, device_id: str, reason: str | None) -> None:
    """Revoke a device: a running gateway disconnects it within a second; its password and certificates are
    refused from then on."""
    cli = _cli()
    cfg = cli._load(config_path, data_dir=data_dir)
    result = cli._db(cfg, lambda c: provisioning.revoke_device(c, device_id, "cli", reason))
    click.echo(f"revoked {device_id} ({result['certificates_revoked']} certificate(s))")


@security.command("ca")
@_common
def ca(config_path: str | None, data_dir: str | None) -> None:
    """Print the CA certificate (PEM) and its SHA-256 fingerprint (the gateway creates it on its first start)."""
    cli = _cli()
    cfg = cli._load(config_path, data_dir=data_dir)
    path = cfg.data_dir / "pki" / "ca.pem"
    if not path.exists():
        raise click.ClickException(f"no CA yet in {path.parent}: start the gateway once (bosun run) to create it")
    click.echo(path.read_text(encoding="utf-8"), nl=False)
    click.echo(f"fingerprint (SHA-256): {_ca_fingerprint(cfg)}")
