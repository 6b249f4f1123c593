"""`bosun hq`: the reference HQ receiver (serve) and its gateway registry (`bosun hq gateway add ID`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import ssl
from pathlib import Path

import click

from gateway.errors import BosunError

__all__ = ["hq"]

log = logging.getLogger("bosun.hq")
_DATA_DIR = "./hq-var"


@click.group(invoke_without_command=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=_DATA_DIR, show_default=True)
@click.option("--port", type=int, default=8090, show_default=True, help="HTTP port (0 picks a free one).")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for a fleet).")
@click.option("--max-batch-mb", type=click.IntRange(1, 1024), default=16, show_default=True, help="Largest batch.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM server certificate: serve HTTPS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM key of --tls-cert.")
@click.option(
    "--client-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM CA: gateways must present a certificate it signed (mutual TLS), besides their token.",
)
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
@click.pass_context
def hq(
    ctx: click.Context,
    data_dir: str,
    port: int,
    bind: str,
    max_batch_mb: int,
    tls_cert: str | None,
    tls_key: str | None,
    client_ca: str | None,
    log_level: str,
) -> None:
    """The reference HQ receiver: stores batches from many gateways exactly once (its own SQLite database).

    Without a subcommand it serves `POST /api/v1/ingest`, the read API under /api/v1/gateways and a status
    page at / until SIGTERM or Ctrl-C.
    """
    ctx.obj = Path(data_dir)
    if ctx.invoked_subcommand is not None:
        return
    if client_ca and not tls_cert:
        raise click.UsageError("--client-ca needs --tls-cert (mutual TLS is TLS)")
    from gateway import logs

    logs.setup(log_level, "text")
    try:
        import uvloop

        uvloop.run(_serve(Path(data_dir), bind, port, max_batch_mb * 1024 * 1024, (tls_cert, tls_key, client_ca)))
    except (OSError, ssl.SSLError, RuntimeError) as exc:
        raise click.ClickException(f"cannot start: {exc}") from None


async def _serve(
    data_dir: Path, bind: str, port: int, max_batch_bytes: int, tls: tuple[str | None, str | None, str | None]
) -> None:
    from gateway.hq.app import create_hq_app
    from gateway.hq.server import HqServer
    from gateway.hq.store import HqStore

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    store = HqStore(data_dir, max_records=1_000_000)
    await store.start()
    web = HqServer(create_hq_app(store, max_batch_bytes), bind, port, *tls)
    try:
        await web.start()
        # tests and scripts wait for this line
        click.echo(f"bosun hq listening on {web.scheme}://{bind}:{web.port} (data {data_dir})")
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await web.stop()
        await store.stop()


@hq.group()
def gateway() -> None:
    """The gateways HQ accepts."""


@gateway.command("add")
@click.argument("gateway_id")
@click.option("--data-dir", "data_dir_opt", type=click.Path(file_okay=False), help="HQ data directory.")
@click.option("--rotate", is_flag=True, help="Give an existing gateway a new token (the old one stops working).")
@click.pass_obj
def gateway_add(obj: Path, gateway_id: str, data_dir_opt: str | None, rotate: bool) -> None:
    """Register GATEWAY_ID and print its token (shown once): the gateway's [uplink] token / BOSUN_UPLINK_TOKEN."""
    from gateway.hq import db

    data_dir = Path(data_dir_opt) if data_dir_opt else obj
    data_dir.mkdir(parents=True, exist_ok=True)
    conn: sqlite3.Connection = db.connect_hq(data_dir / "hq.db")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            token = db.add_gateway(conn, gateway_id, rotate=rotate)
        except BosunError as exc:
            conn.execute("ROLLBACK")
            raise click.ClickException(str(exc)) from None
        conn.execute("COMMIT")
    finally:
        conn.close()
    click.echo(token)


@gateway.command("list")
@click.option("--data-dir", "data_dir_opt", type=click.Path(file_okay=False), help="HQ data directory.")
@click.pass_obj
def gateway_list(obj: Path, data_dir_opt: str | None) -> None:
    """Gateways with their records by lane and losses."""
    from gateway.hq import db

    data_dir = Path(data_dir_opt) if data_dir_opt else obj
    conn = db.connect_hq(data_dir / "hq.db")
    try:
        for g in db.gateways(conn):
            lanes = " ".join(f"{lane}={v['records']}" for lane, v in sorted(g["lanes"].items()))
            click.echo(f"{g['id']}  {lanes}  lost={sum(g['lost'].values())}  last_error={g['last_error'] or '-'}")
    finally:
        conn.close()


@hq.group()
def token() -> None:
    """Tokens for HQ's read API and status page."""


@token.command("create")
@click.option("--label", required=True, help="Who or what reads with it.")
@click.option("--data-dir", "data_dir_opt", type=click.Path(file_okay=False), help="HQ data directory.")
@click.pass_obj
def token_create(obj: Path, label: str, data_dir_opt: str | None) -> None:
    """Print a new reader token (shown once): `Authorization: Bearer <token>` on /api/v1/gateways and /."""
    from gateway.hq import db

    data_dir = Path(data_dir_opt) if data_dir_opt else obj
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = db.connect_hq(data_dir / "hq.db")
    try:
        conn.execute("BEGIN IMMEDIATE")
        reader = db.add_reader(conn, label)
        conn.execute("COMMIT")
    finally:
        conn.close()
    click.echo(reader)
