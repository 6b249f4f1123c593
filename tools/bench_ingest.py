"""Event-loop CPU per telemetry message of `Ingest.submit` (with the codec and presence work it calls).

A real Ingest with a real Writer (default config: bulk rows are committed by the writer's child process) on a
temporary SQLite file, ~1000 sensor devices seeded the way the benchmark seeds them, then `submit()` for
benchmark-like telemetry (gateway/bench/scenarios.py: 44-byte JSON objects of two metrics) in chunks, yielding
to the loop between chunks so futures resolve and rows flow. Per message, for each round:

- `submit`: the loop thread's CPU time (and the wall time) inside `Message(...)` + `Ingest.submit`, what the
  broker pays per PUBLISH. The CPU figure is the one to compare: the wall time also counts the writer's child
  process and threads taking the machine's cores.
- `with turns`: the wall time including the loop turns between chunks (end-of-turn tallies, commit callbacks,
  the writer's hand-off to its child); waits for room in the writer are not counted.

    .venv/bin/python tools/bench_ingest.py [--messages 200000] [--devices 1000] [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import config
from gateway.accounts import Accounts
from gateway.bench.scenarios import _telemetry_payloads
from gateway.bench.seed import seed
from gateway.hub import Hub
from gateway.ingest import Ingest, Message
from gateway.metrics import Metrics
from gateway.presence import Presence
from gateway.store.reader import Reader
from gateway.store.writer import Writer


@dataclass
class Round:
    count: int
    cpu: float  # seconds of this thread's CPU inside the submit loops
    wall: float  # wall seconds inside the submit loops
    turns: float  # wall seconds including the loop turns between chunks

    def per_message(self, seconds: float) -> float:
        return seconds * 1e6 / self.count


async def bench(messages: int, devices: int, chunk: int, rounds: int, profile: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bosun-bench-ingest-") as tmp:
        data_dir = Path(tmp) / "var"
        seeded = seed(data_dir, devices)
        cfg = config.load(None, {}, {"gateway.data_dir": str(data_dir), "discovery.enabled": False})
        metrics = Metrics()
        hub = Hub(metrics)
        writer = Writer(cfg.db_path, cfg.store, metrics)
        reader = Reader(cfg.db_path)
        accounts = Accounts(reader)
        presence = Presence(cfg.presence, writer, hub, metrics)
        ingest = Ingest(cfg, writer, accounts, presence, hub, metrics)
        await writer.start()
        await reader.start()
        await accounts.reload()  # the registry once, without the poll task
        await presence.start()
        try:
            root = cfg.mqtt.root
            topics = [d.topic(root, "telemetry") for d in seeded.devices]
            clients = [d.device_id for d in seeded.devices]
            payloads = _telemetry_payloads()
            print(f"{devices} devices, {messages} messages a round, {len(payloads[0])}-byte payloads: {payloads[0]!r}")
            await _round(ingest, writer, topics, clients, payloads, min(messages, 20_000), chunk, None)  # warm-up
            results = []
            for n in range(rounds):
                prof = cProfile.Profile() if profile and n == 0 else None
                result = await _round(ingest, writer, topics, clients, payloads, messages, chunk, prof)
                note = " (profiled)" if prof is not None else ""
                print(
                    f"round {n + 1}{note}: submit {result.per_message(result.cpu):6.2f} us/msg CPU,"
                    f" {result.per_message(result.wall):6.2f} us/msg wall;"
                    f" with turns {result.per_message(result.turns):6.2f} us/msg wall"
                )
                if prof is not None:
                    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                else:
                    results.append(result)
            if results:
                cpu = statistics.median(r.per_message(r.cpu) for r in results)
                wall = statistics.median(r.per_message(r.wall) for r in results)
                print(f"median submit: {cpu:.2f} us/msg CPU, {wall:.2f} us/msg wall")
        finally:
            await presence.stop()
            await accounts.stop()
            await reader.stop()
            await writer.stop()


async def _round(
    ingest: Ingest,
    writer: Writer,
    topics: list[str],
    clients: list[str],
    payloads: list[bytes],
    count: int,
    chunk: int,
    prof: cProfile.Profile | None,
) -> Round:
    submit = ingest.submit
    clock = time.perf_counter
    cpu = time.thread_time
    devices = len(topics)
    variants = len(payloads)
    result = Round(count, 0.0, 0.0, 0.0)
    sent = 0
    while sent < count:
        await writer.wait_room()  # backpressure, as the broker applies it: not counted
        n = min(chunk, count - sent)
        if prof is not None:
            prof.enable()
        start, start_cpu = clock(), cpu()
        for i in range(sent, sent + n):
            d = i % devices
            submit(Message(clients[d], topics[d], payloads[i % variants], 1, False, time.time()))
        end, end_cpu = clock(), cpu()
        await asyncio.sleep(0)  # end-of-turn callbacks: tallies, the writer's hand-off
        after = clock()
        if prof is not None:
            prof.disable()
        result.cpu += end_cpu - start_cpu
        result.wall += end - start
        result.turns += after - start
        sent += n
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000, help="messages a round")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=200, help="messages submitted per loop turn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile the first round (left out of the median)")
    parser.add_argument("--asyncio", action="store_true", help="the stdlib loop instead of uvloop (as the gateway)")
    args = parser.parse_args()
    coro: Coroutine[Any, Any, None] = bench(args.messages, args.devices, args.chunk, args.rounds, args.profile)
    if args.asyncio:
        asyncio.run(coro)
    else:
        import uvloop

        uvloop.run(coro)


if __name__ == "__main__":
    main()
