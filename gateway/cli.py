"""The `bosun` command line (click). The composition root: only this module wires components together."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from gateway import __version__, config
from gateway.errors import BosunError
from gateway.hq.cli import hq
from gateway.models import DeviceRow
from gateway.security_cli import security
from gateway.store import mindex, registry
from gateway.store.schema import connect, migrate

T = TypeVar("T")
log = logging.getLogger("bosun")


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--data-dir", type=click.Path(file_okay=False), help="Data directory (overrides the config).")(fn)
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        help="TOML config file; BOSUN_<SECTION>_<KEY> variables override it.",
    )(fn)
    return fn


def _load(config_path: str | None, **overrides: Any) -> config.Config:
    mapping = {
        "gateway.data_dir": overrides.get("data_dir"),
        "mqtt.port": overrides.get("mqtt_port"),
        "tls.port": overrides.get("mqtts_port"),
        "http.port": overrides.get("http_port"),
        "mqtt.bind": overrides.get("bind"),
        "http.bind": overrides.get("bind"),
    }
    try:
        return config.load_from_cli(config_path, {k: v for k, v in mapping.items() if v is not None})
    except BosunError as exc:
        raise click.ClickException(f"config: {exc}") from None


def _db(cfg: config.Config, fn: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
    """Run `fn` in one transaction on our own connection (safe while the gateway runs: WAL, busy timeout)."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(cfg.db_path, synchronous=cfg.store.synchronous)
    try:
        migrate(conn)
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result
    except BosunError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        conn.close()


@click.group()
@click.version_option(__version__, prog_name="bosun")
def main() -> None:
    """Bosun: offline-first edge gateway (MQTT broker, durable store, crew calls, uplink to HQ)."""


@main.command()
@_common
@click.option("--mqtt-port", type=int, help="MQTT port (0 picks a free one).")
@click.option("--mqtts-port", type=int, help="MQTT over TLS port (0 picks a free one, -1 turns TLS off).")
@click.option("--http-port", type=int, help="HTTP port (0 picks a free one).")
@click.option("--bind", help="Address for both listeners, e.g. 127.0.0.1.")
def run(
    config_path: str | None,
    data_dir: str | None,
    mqtt_port: int | None,
    mqtts_port: int | None,
    http_port: int | None,
    bind: str | None,
) -> None:
    """Start the gateway and serve until SIGTERM or Ctrl-C."""
    cfg = _load(
        config_path, data_dir=data_dir, mqtt_port=mqtt_port, mqtts_port=mqtts_port, http_port=http_port, bind=bind
    )
    from gateway import logs

    logs.setup(cfg.log.level, cfg.log.format)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # uvloop is a dependency; this only keeps odd platforms running
        runner = asyncio.run
    try:
        runner(_serve(cfg))
    except BosunError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None


async def _serve(cfg: config.Config) -> None:
    from gateway.runtime import Gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = {"count": 0}

    def on_signal(signum: int) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            log.error("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        log.info("%s: stopping (committing everything queued; send it again to force)", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    gateway = Gateway(cfg)
    await gateway.start()
    try:
        _banner(gateway)
        await stop.wait()
    finally:
        await gateway.stop()
        log.info("stopped cleanly")


def _banner(gw: Any) -> None:
    host = gw.cfg.http.bind if gw.cfg.http.bind not in ("0.0.0.0", "::") else "localhost"
    mhost = gw.cfg.mqtt.bind if gw.cfg.mqtt.bind not in ("0.0.0.0", "::") else "localhost"
    lines = [f"Bosun {__version__} gateway {gw.gateway_id} is running (data in {gw.cfg.data_dir.resolve()})"]
    if gw.bootstrap.admin_password:
        lines += [
            "  First start: created user 'admin' with password (shown once, store it now):",
            f"      {gw.bootstrap.admin_password}",
            f"  API token:  bosun token create --user admin --data-dir {gw.cfg.data_dir}",
        ]
    lines += [
        f"  MQTT   mqtt://{mhost}:{gw.mqtt_port}   (devices: bosun device add ...)",
        *([f"  MQTTS  mqtts://{mhost}:{gw.mqtts_port}   (CA: bosun security ca)"] if gw.mqtts_port else []),
        f"  HTTP   http://{host}:{gw.http_port}   (health: /healthz, API: /api/v1, schema: /schema)",
    ]
    click.echo("\n".join(lines), err=False)
    sys.stdout.flush()


@main.group()
def device() -> None:
    """Register and list devices."""


@device.command("add")
@_common
@click.argument("device_id")
@click.option("--site", required=True)
@click.option("--room", required=True)
@click.option("--type", "type_", required=True, type=click.Choice(registry.DEVICE_TYPES))
@click.option("--name", help="A display name.")
@click.option("--password", help="Use this secret (>= 128 bits) instead of a generated one.")
def device_add(
    config_path: str | None,
    data_dir: str | None,
    device_id: str,
    site: str,
    room: str,
    type_: str,
    name: str | None,
    password: str | None,
) -> None:
    """Register DEVICE_ID; prints its MQTT credentials once (username = device id)."""
    cfg = _load(config_path, data_dir=data_dir)
    new = registry.NewDevice(device_id, site, room, type_, password, name)
    row, secret = _db(cfg, lambda c: registry.add_device(c, new, actor="cli"))
    click.echo(f"device {row.device_id} registered in {row.site}/{row.room} as {row.type}")
    click.echo(f"  username: {row.device_id}")
    click.echo(f"  password: {secret}")
    click.echo(f"  publish under: {cfg.mqtt.root}/{row.site}/{row.room}/{row.type}/{row.device_id}/")


@device.command("list")
@_common
@click.option("--site")
@click.option("--room")
@click.option("--type", "type_")
def device_list(
    config_path: str | None, data_dir: str | None, site: str | None, room: str | None, type_: str | None
) -> None:
    """List registered devices."""
    from rich.console import Console
    from rich.table import Table

    cfg = _load(config_path, data_dir=data_dir)
    rows = _db(cfg, lambda c: registry.list_devices(c, site, room, type_), write=False)
    table = Table("device", "site", "room", "type", "online", "battery", "last seen", "disabled")
    for r in rows:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.last_seen)) if r.last_seen else "-"
        table.add_row(
            r.device_id,
            r.site,
            r.room,
            r.type,
            "yes" if r.online else "no",
            "-" if r.battery is None else f"{r.battery:g}",
            seen,
            "yes" if r.disabled else "",
        )
    Console().print(table)
    click.echo(f"{len(rows)} device(s)")


@device.command("import")
@_common
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--credentials-out",
    type=click.Path(dir_okay=False),
    help="Write generated passwords here (CSV) instead of printing them.",
)
def device_import(config_path: str | None, data_dir: str | None, csv_file: str, credentials_out: str | None) -> None:
    """Import an installer's room list: CSV columns device_id, site, room, type, password (may be empty)."""
    cfg = _load(config_path, data_dir=data_dir)
    out = None
    if credentials_out:
        # opened before the import commits: if it cannot be written, nothing is registered
        try:
            fd = os.open(credentials_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise click.ClickException(f"cannot write {credentials_out}: {exc.strerror}") from None
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode otherwise
        out = os.fdopen(fd, "w")
    started = time.perf_counter()
    try:
        result = _db(cfg, lambda c: registry.import_devices(c, Path(csv_file), actor="cli"))
    except BaseException:
        if out is not None:
            out.close()
            os.unlink(credentials_out)  # type: ignore[arg-type]
        raise
    elapsed = time.perf_counter() - started
    generated = [(d, p) for d, p in result if p is not None]
    if out is not None:
        with out:
            out.write("device_id,password\n")
            out.writelines(f"{d},{p}\n" for d, p in generated)
        click.echo(f"generated passwords written to {credentials_out} (mode 600)")
    elif generated:
        click.echo("device_id,password")
        for d, p in generated:
            click.echo(f"{d},{p}")
    click.echo(f"imported {len(result)} device(s) in {elapsed:.2f} s", err=True)


@main.group()
def integration() -> None:
    """MQTT accounts for Node-RED, Home Assistant, Grafana on the LAN."""


@integration.command("add")
@_common
@click.argument("name")
@click.option("--password", required=True, help="At least 12 characters.")
@click.option("--read", "read", multiple=True, required=True, help="Topic filter it may subscribe to (repeatable).")
@click.option("--write", "write", multiple=True, help="Topic filter it may publish to (repeatable).")
def integration_add(
    config_path: str | None,
    data_dir: str | None,
    name: str,
    password: str,
    read: tuple[str, ...],
    write: tuple[str, ...],
) -> None:
    """Create an MQTT account limited to the given patterns."""
    cfg = _load(config_path, data_dir=data_dir)
    _db(cfg, lambda c: registry.add_integration(c, name, password, list(read), list(write), actor="cli"))
    click.echo(f"integration {name}: read {', '.join(read)}; write {', '.join(write) or '(nothing)'}")


@main.group()
def user() -> None:
    """People who use the web UI and the API."""


@user.command("add")
@_common
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["admin", "installer", "crew"]))
@click.option("--password", help="At least 10 characters; generated and printed if left out.")
def user_add(config_path: str | None, data_dir: str | None, name: str, role: str, password: str | None) -> None:
    """Create a user."""
    import secrets

    cfg = _load(config_path, data_dir=data_dir)
    chosen = password or secrets.token_urlsafe(12)
    _db(cfg, lambda c: registry.add_user(c, name, role, chosen, actor="cli"))
    click.echo(f"user {name} ({role}) created")
    if password is None:
        click.echo(f"  password: {chosen}")


@main.group()
def token() -> None:
    """API tokens."""


@token.command("create")
@_common
@click.option("--user", "username", required=True)
@click.option("--label", help="What the token is for.")
def token_create(config_path: str | None, data_dir: str | None, username: str, label: str | None) -> None:
    """Print a new API token for USER (shown once; use as Authorization: Bearer <token>)."""
    cfg = _load(config_path, data_dir=data_dir)
    click.echo(_db(cfg, lambda c: registry.create_token(c, username, label, actor="cli")))


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("check")
@_common
def db_check(config_path: str | None, data_dir: str | None) -> None:
    """Integrity check and row counts."""
    cfg = _load(config_path, data_dir=data_dir)
    if not cfg.db_path.exists():
        raise click.ClickException(f"no database at {cfg.db_path}")

    def check(conn: sqlite3.Connection) -> tuple[str, dict[str, int], int]:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        tables = [
            "devices",
            "credentials",
            "users",
            "api_tokens",
            "measurements",
            "events",
            "traffic",
            "commands",
            "audit_log",
            "outbox",
        ]
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
        return result, counts, conn.execute("PRAGMA user_version").fetchone()[0]

    result, counts, version = _db(cfg, check, write=False)
    click.echo(f"database {cfg.db_path} (schema {version}): integrity {result}")
    for table, count in counts.items():
        click.echo(f"  {table:<13} {count}")
    index = mindex.index_path(cfg.db_path)
    if index.exists():
        click.echo(f"measurements index {index}: {_index_check(index, counts['measurements'])}")
    if result != "ok":
        sys.exit(1)


def _index_check(path: Path, measurements: int) -> str:
    """The index file's state in one line. It is derived data: a damaged one is rebuilt when the gateway starts, so
    it does not fail the check."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            result = conn.execute("PRAGMA integrity_check").fetchone()[0]
            entries = conn.execute("SELECT count(*) FROM mi").fetchone()[0]
            reached = mindex.indexed_to(conn, "main")
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return f"damaged ({exc}): the gateway rebuilds it when it starts"
    if result != "ok":
        return f"integrity {result}: the gateway rebuilds it when it starts"
    return f"integrity ok, {entries} entries for {measurements} measurements, indexed up to row {reached}"


@main.group("config")
def config_group() -> None:
    """Inspect configuration."""


@config_group.command("show")
@_common
def config_show(config_path: str | None, data_dir: str | None) -> None:
    """Every setting with its effective value, environment variable and help."""
    cfg = _load(config_path, data_dir=data_dir)
    for env, dotted, _default, help_text in config.describe():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if key in _SECRET_KEYS and value:
            value = "<set, not shown>"  # the output ends up in tickets and chat logs
        click.echo(f"{dotted} = {value!r}    [{env}] {help_text}")


_SECRET_KEYS = {"token", "password", "secret"}


def _delay_range(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, float]:
    from gateway.simulate import parse_range

    try:
        return parse_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@_common
@click.option("--devices", "count", type=int, default=20, show_default=True, help="Simulated devices.")
@click.option("--rate", type=float, default=1.0, show_default=True, help="Messages per second per device.")
@click.option("--duration", type=float, default=30.0, show_default=True, help="Seconds to run.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Gateway address.")
@click.option("--mqtt-port", type=int, help="Gateway MQTT port (default: from the config).")
@click.option("--http-port", type=int, help="Gateway HTTP port for its figures (default: from the config).")
@click.option("--site", default="sim", show_default=True)
@click.option(
    "--press-share",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Share of a button's messages that are guest presses.",
)
@click.option(
    "--accept-delay",
    default="2-10",
    show_default=True,
    callback=_delay_range,
    help="Seconds (LOW-HIGH, uniform) a watch takes to accept or decline a call.",
)
@click.option(
    "--done-delay",
    default="3-10",
    show_default=True,
    callback=_delay_range,
    help="Seconds (LOW-HIGH) from a watch's confirmed accept to completing the call.",
)
@click.option(
    "--decline",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="Chance that a watch's answer is a decline.",
)
@click.option(
    "--ignore",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="Chance that a watch never answers a call.",
)
@click.option(
    "--api-token",
    help="API token for the gateway's call stats; without it one is minted in the data directory's database "
    "(for its first crew, installer or admin user) and revoked at the end.",
)
@click.option("--seed", type=int, help="Seed the random choices (presses, delays, answers).")
def simulate(
    config_path: str | None,
    data_dir: str | None,
    count: int,
    rate: float,
    duration: float,
    host: str,
    mqtt_port: int | None,
    http_port: int | None,
    site: str,
    press_share: float,
    accept_delay: tuple[float, float],
    done_delay: tuple[float, float],
    decline: float,
    ignore: float,
    api_token: str | None,
    seed: int | None,
) -> None:
    """Run N real MQTT devices (buttons, watches, sensors, repeaters) against a running gateway.

    Guests press buttons; watches answer the calls like crew (received at once, then accept, decline or
    never answer; accepted calls are completed later). The report shows the call loop end to end.
    """
    import random

    from gateway.simulate import Crew, Plan, run_simulation

    cfg = _load(config_path, data_dir=data_dir, mqtt_port=mqtt_port, http_port=http_port)
    if seed is not None:
        random.seed(seed)
    # amqtt logs every refused or dropped connection; the report counts them as device errors
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    plan = Plan(
        count=count,
        rate=rate,
        duration=duration,
        host=host,
        mqtt_port=cfg.mqtt.port,
        http_port=cfg.http.port,
        site=site,
        root=cfg.mqtt.root,
        crew=Crew(accept_delay=accept_delay, done_delay=done_delay, decline=decline, ignore=ignore),
        press_share=press_share,
        api_token=api_token,
    )

    def prepare(conn: sqlite3.Connection) -> tuple[list[tuple[DeviceRow, str]], str | None]:
        return _sim_devices(conn, plan), None if api_token else _sim_token(conn)

    credentials, minted = _db(cfg, prepare)
    if minted is not None:
        plan = dataclasses.replace(plan, api_token=minted)
    try:
        asyncio.run(run_simulation(plan, credentials))
    except OSError as exc:
        raise click.ClickException(f"cannot reach the gateway at {host}:{cfg.mqtt.port}: {exc}") from None
    finally:
        if minted is not None:
            _db(cfg, lambda c: _revoke_sim_token(c, minted))


def _sim_token(conn: sqlite3.Connection) -> str | None:
    """A token for the call stats, for the least privileged enabled user (stats are open to every role)."""
    row = conn.execute(
        "SELECT username FROM users WHERE disabled = 0 "
        "ORDER BY CASE role WHEN 'crew' THEN 0 WHEN 'installer' THEN 1 ELSE 2 END, created_at LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    return registry.create_token(conn, row[0], "bosun simulate (revoked when it ends)", actor="simulate")


def _revoke_sim_token(conn: sqlite3.Connection, token: str) -> None:
    from gateway import passwords
    from gateway.store.records import audit

    found = conn.execute(
        "UPDATE api_tokens SET revoked = 1 WHERE token_hash = ? RETURNING username", (passwords.token_hash(token),)
    ).fetchone()
    if found is not None:
        audit(conn, "simulate", "token.revoke", found[0], {"label": "bosun simulate"})


def _sim_devices(conn: sqlite3.Connection, plan: Any) -> list[tuple[DeviceRow, str]]:
    """Simulated devices get real registry credentials; re-runs reset their secrets."""
    from gateway import passwords

    types = ("button", "sensor", "watch", "repeater")
    out = []
    for index in range(plan.count):
        type_ = types[0] if index % 10 < 5 else types[1] if index % 10 < 8 else types[2] if index % 10 < 9 else types[3]
        device_id = f"sim-{type_[:3]}-{index:04d}"
        room = f"cabin-{index // 4:03d}"
        try:
            row = registry.get_device(conn, device_id)
            secret = passwords.generate_secret()
            conn.execute(
                "UPDATE credentials SET secret_hash = ? WHERE username = ?",
                (passwords.hash_secret(secret), device_id),
            )
        except BosunError:
            row, secret = registry.add_device(
                conn, registry.NewDevice(device_id, plan.site, room, type_), actor="simulate"
            )
        out.append((row, secret))
    return out


main.add_command(hq)  # `bosun hq`: the reference HQ receiver (gateway/hq)
main.add_command(security)  # `bosun security`: provisioning tokens, revocation, the CA (gateway/security_cli)
