"""`python -m gateway.bench`: options, the event loop, and the exit code."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from gateway.bench import report
from gateway.bench.runner import Settings, run

__all__ = ["main"]

QUICK = {
    "devices": 20,
    "rates": (200.0,),
    "duration": 2.0,
    "warmup": 1.0,
    "normal_duration": 2.0,
    "idle": 20,
    "relay_qos0": 3000,
    "relay_qos1": 2000,
    "relay_rounds": 1,
    "relay_deadline": 15.0,
}


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise click.BadParameter("rates must be positive")
    return tuple(sorted(rates))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--devices", type=click.IntRange(1, 20_000), help="Device connections (default 1000).")
@click.option("--rate", type=click.FloatRange(min=1), help="One aggregate rate in msg/s (instead of --rates).")
@click.option("--rates", help="Comma-separated aggregate rates in msg/s, run in order (default 10000,20000).")
@click.option("--duration", type=click.FloatRange(min=0.5), help="Measured window per rate, seconds (default 20).")
@click.option("--warmup", type=click.FloatRange(min=0), help="Warm-up before each window, seconds (default 5).")
@click.option(
    "--normal-duration",
    type=click.FloatRange(min=0),
    help="Measured window of the synchronous=NORMAL run (default half of --duration; 0 skips it).",
)
@click.option("--qos", type=click.IntRange(0, 1), help="QoS of the devices' telemetry (default 1).")
@click.option("--inflight", type=click.IntRange(1, 1000), help="Unacknowledged QoS 1 messages per device (20).")
@click.option("--idle", type=click.IntRange(0, 20_000), help="Idle subscribers in the relay (default --devices).")
@click.option("--relay-messages", help="Relay messages for QoS 0 and QoS 1, e.g. 50000,30000 (QoS 1 under 60000).")
@click.option(
    "--relay-rounds",
    type=click.IntRange(1, 20),
    help="Relay rounds per broker and QoS; the median is reported (default 3, 1 with --quick).",
)
@click.option("--relay-sync", type=click.Choice(["NORMAL", "FULL"]), help="synchronous mode of the gateway relayed.")
@click.option("--skip-relay", is_flag=True, help="Only the durable scenario.")
@click.option("--skip-mosquitto", is_flag=True, help="No Mosquitto baseline (no ratios).")
@click.option("--quick", is_flag=True, help="20 devices, 2 s windows, a few thousand relay messages (smoke test).")
@click.option("--out", type=click.Path(dir_okay=False), help="JSON file for the figures (bench-results.json).")
@click.option("--strict", is_flag=True, help="Exit with 1 when a target fails.")
def main(**options: Any) -> None:
    """Benchmark the gateway (durable ingest, PUBACK, commit and live-bus latency, relay) against Mosquitto.

    Starts its own gateways (synchronous=FULL, then NORMAL) and Mosquitto on free loopback ports with a
    temporary data directory; BOSUN_* variables in the environment pass through to the gateway.
    """
    settings = _settings(options)
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=150)  # logs and CI: no terminal to size the tables to
    try:
        results = _run(settings, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every subprocess and temporary file was cleaned up[/]")
        sys.exit(130)
    results["targets"] = report.evaluate(results)
    report.render(results, console)
    out = Path(settings.out)
    report.write_json(results, out)
    console.print(f"figures written to {out.resolve()}")
    if results["errors"]:
        sys.exit(2)
    if options["strict"] and any(t["verdict"] == "fail" for t in results["targets"]):
        sys.exit(1)


def _settings(options: dict[str, Any]) -> Settings:
    values: dict[str, Any] = dict(QUICK) if options["quick"] else {}
    if options["rate"] is not None and options["rates"] is not None:
        raise click.UsageError("give --rate or --rates, not both")
    if options["rate"] is not None:
        values["rates"] = (options["rate"],)
    elif options["rates"] is not None:
        values["rates"] = _rates(options["rates"])
    plain = ("devices", "duration", "warmup", "normal_duration", "qos", "inflight", "idle", "relay_rounds")
    for key in (*plain, "relay_sync", "out"):
        if options[key] is not None:
            values[key] = options[key]
    if options["normal_duration"] is None and not options["quick"]:
        values["normal_duration"] = max(1.0, values.get("duration", Settings.duration) / 2)
    if options["idle"] is None and options["devices"] is not None:
        values["idle"] = options["devices"]
    if options["relay_messages"]:
        try:
            qos0, qos1 = (int(x) for x in options["relay_messages"].split(","))
        except ValueError:
            raise click.BadParameter("expected two integers: QoS 0,QoS 1", param_hint="--relay-messages") from None
        if not (qos0 > 0 and 0 < qos1 < 60_000):
            raise click.BadParameter("QoS 1 must stay under 60,000 messages", param_hint="--relay-messages")
        values["relay_qos0"], values["relay_qos1"] = qos0, qos1
    values["skip_relay"] = options["skip_relay"]
    values["skip_mosquitto"] = options["skip_mosquitto"]
    values["quick"] = options["quick"]
    return Settings(**values)


def _run(settings: Settings, console: Console) -> dict[str, Any]:
    async def main_task() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(settings, console)

    try:
        import uvloop

        return uvloop.run(main_task())
    except asyncio.CancelledError:  # SIGTERM
        raise KeyboardInterrupt from None
