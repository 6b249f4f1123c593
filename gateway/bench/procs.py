"""The brokers under test as subprocesses: the gateway (`python -m gateway run`) and Mosquitto.

Each child gets its own session (a Ctrl-C in the terminal reaches only the benchmark, which stops them in
order) and PR_SET_PDEATHSIG (if the benchmark is killed, the kernel stops them). CPU time is utime + stime of
all threads from /proc/PID/stat; RSS from /proc/PID/statm.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

__all__ = ["Proc", "free_port", "mosquitto_binary", "mosquitto_version", "start_gateway", "start_mosquitto"]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the kernel stops us if the benchmark dies


class Proc:
    """A child process with its output in `log_path`."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def _pids(self) -> list[int]:
        """The process and its children (the gateway's bulk writer process is part of the gateway)."""
        pids = [self.pid]
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            children = []
        return pids + [int(c) for c in children]

    def cpu_seconds(self) -> float:
        """utime + stime of the process and its children (all threads), in seconds; 0 once it has exited."""
        total = 0.0
        for pid in self._pids():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / _TICKS
        return total

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children."""
        total = 0
        for pid in self._pids():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
            except OSError:
                continue
        return total

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds (the gateway commits what it holds), then SIGKILL."""
        try:
            if self.alive:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(self.popen.wait, grace)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
            return await asyncio.to_thread(self.popen.wait, 10)
        finally:
            self._log.close()

    def kill(self) -> None:
        """Last resort (interpreter exit): no waiting."""
        if self.alive:
            self.popen.kill()
        self._log.close()


class GatewayProc(Proc):
    def __init__(self, data_dir: Path, env: Mapping[str, str], log_path: Path) -> None:
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.data_dir = data_dir
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--data-dir",
            str(data_dir),
            "--mqtt-port",
            str(self.mqtt_port),
            "--http-port",
            str(self.http_port),
            "--mqtts-port",
            "-1",  # the benchmark speaks plain MQTT; a TLS listener on 8883 would clash with any other gateway
            "--bind",
            "127.0.0.1",
        ]
        super().__init__("gateway", argv, log_path, env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def wait_ready(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if not self.alive:
                    raise RuntimeError(f"the gateway exited with {self.popen.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/healthz")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway was not healthy after {within:g} s:\n{self.log_tail()}")
                await asyncio.sleep(0.1)


def gateway_env(synchronous: str, anonymous_prefix: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The process environment plus the bench's settings (other BOSUN_* variables pass through on purpose)."""
    env = dict(os.environ)
    env.update(extra)
    env.update(
        {
            "BOSUN_STORE_SYNCHRONOUS": synchronous,
            "BOSUN_MQTT_ALLOW_ANONYMOUS": "true",
            "BOSUN_MQTT_ANONYMOUS_PUBLISH": f"{anonymous_prefix}/#",
            "BOSUN_MQTT_ANONYMOUS_SUBSCRIBE": f"{anonymous_prefix}/#",
            "BOSUN_LOG_LEVEL": env.get("BOSUN_LOG_LEVEL", "WARNING"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


async def start_gateway(
    data_dir: Path, synchronous: str, anonymous_prefix: str, log_path: Path, extra: Mapping[str, str]
) -> GatewayProc:
    proc = GatewayProc(data_dir, gateway_env(synchronous, anonymous_prefix, extra), log_path)
    try:
        await proc.wait_ready()
    except BaseException:
        await proc.stop(grace=5)
        raise
    return proc


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.replace("mosquitto version", "").strip() or "unknown"


class MosquittoProc(Proc):
    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # unlimited: with the default of 1000 it drops QoS 1 messages for a lagging subscriber
            "max_queued_messages 0\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        super().__init__("mosquitto", [binary, "-c", str(conf)], workdir / "mosquitto.log")

    async def wait_ready(self, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while True:
            if not self.alive:
                raise RuntimeError(f"mosquitto exited with {self.popen.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not listen on {self.port} after {within:g} s")
            await asyncio.sleep(0.05)


async def start_mosquitto(binary: str, workdir: Path) -> MosquittoProc:
    proc = MosquittoProc(binary, workdir)
    try:
        await proc.wait_ready()
    except BaseException:
        await proc.stop(grace=5)
        raise
    return proc
