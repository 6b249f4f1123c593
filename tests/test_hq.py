"""`bosun hq`, the reference HQ receiver, as a real process on loopback: tokens, idempotent batches, refusals
that name the problem and leave other gateways alone, and the read API."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from gateway.uplink import batch

ROOT = Path(__file__).resolve().parent.parent
CT = {"Content-Type": "application/vnd.bosun.batch"}


class Hq:
    """A `bosun hq` subprocess; `restart()` brings it back on the same port after a kill."""

    def __init__(self, data_dir: Path, port: int = 0, *extra: str) -> None:
        self.data_dir = data_dir
        self.port = port
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.scheme = "http"
        self._reader = ""

    def start(self) -> Hq:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "hq", "--data-dir", str(self.data_dir), "--port", str(self.port),
             *self.extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            found = re.search(r"listening on (https?)://[^:]+:(\d+)", line)
            if found:
                self.scheme, self.port = found.group(1), int(found.group(2))
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return self
        raise AssertionError("bosun hq did not start:\n" + "".join(lines))

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                assert self.proc.wait(10) == 0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def reader(self) -> str:
        """A read-API token, made once (`bosun hq token create`)."""
        if not self._reader:
            self._reader = self._cli("token", "create", "--label", "tests")
        return self._reader

    def get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.reader()}"}
        return httpx.get(self.url + path, params=params, headers=headers, timeout=10)

    def _cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "hq", "--data-dir", str(self.data_dir), *args],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    def add_gateway(self, gateway_id: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "hq", "gateway", "add", gateway_id, "--data-dir", str(self.data_dir)],
            cwd=ROOT, capture_output=True, text=True, check=True, env={**os.environ},
        )  # fmt: skip
        return out.stdout.strip()


@pytest.fixture
def hq(tmp_path: Path) -> Iterator[Hq]:
    server = Hq(tmp_path / "hq", 0, "--max-batch-mb", "1").start()
    try:
        yield server
    finally:
        server.stop()


def telemetry(gw: str, first: int, last: int) -> bytes:
    rows = [(i, f"s-{i % 3}", "t", 1000.0 + i, float(i)) for i in range(first, last + 1)]
    return batch.encode_telemetry(gw, first, rows)


def post(hq: Hq, token: str, key: str, payload: bytes) -> httpx.Response:
    headers = {**CT, "Authorization": f"Bearer {token}", "Idempotency-Key": key}
    return httpx.post(f"{hq.url}/api/v1/ingest", content=payload, headers=headers, timeout=10)


def test_the_same_batch_twice_is_stored_once_and_overlaps_are_trimmed(hq: Hq) -> None:
    token = hq.add_gateway("gw-a")
    first = post(hq, token, "gw-a:telemetry:1-100", telemetry("gw-a", 1, 100))
    assert first.status_code == 200
    assert first.json() == {"gateway": "gw-a", "lane": "telemetry", "acked": 100, "stored": 100, "duplicate": False}
    again = post(hq, token, "gw-a:telemetry:1-100", telemetry("gw-a", 1, 100))
    assert again.json() == {"gateway": "gw-a", "lane": "telemetry", "acked": 100, "stored": 0, "duplicate": True}
    # a gateway that died before moving its cursor may cut its next batch differently: only 101-150 are new
    overlap = post(hq, token, "gw-a:telemetry:51-150", telemetry("gw-a", 51, 150))
    assert overlap.json()["stored"] == 50 and overlap.json()["acked"] == 150
    rows = hq.get("/api/v1/gateways/gw-a/measurements", params={"limit": 1000}).json()
    assert [r["value"] for r in rows] == [float(i) for i in range(1, 151)]
    assert set(rows[0]) == {"ts", "device_id", "metric", "value"}
    only = hq.get("/api/v1/gateways/gw-a/measurements", params={"metric": "t", "limit": 2}).json()
    assert only == [{"ts": 1001.0, "device_id": "s-1", "metric": "t", "value": 1.0},
                    {"ts": 1002.0, "device_id": "s-2", "metric": "t", "value": 2.0}]  # fmt: skip
    (gw,) = hq.get("/api/v1/gateways").json()
    assert gw["lanes"]["telemetry"]["records"] == 150 and gw["lanes"]["telemetry"]["duplicates"] == 1


def test_bad_batches_are_refused_clearly_and_other_gateways_go_on(hq: Hq) -> None:
    bad, good = hq.add_gateway("gw-bad"), hq.add_gateway("gw-good")
    corrupt = post(hq, bad, "gw-bad:telemetry:1-3", b"\x78\x9c garbage")
    assert corrupt.status_code == 400 and "not zlib-compressed" in corrupt.json()["message"]
    big = post(hq, bad, "gw-bad:telemetry:1-3", os.urandom(1024 * 1024 + 10))
    assert big.status_code == 413 and "exceeds this HQ's limit" in big.json()["message"]
    other = post(hq, bad, "gw-good:telemetry:1-3", telemetry("gw-good", 1, 3))
    assert other.status_code == 403 and "gw-good" in other.json()["message"]
    unknown = post(hq, "nope", "x:telemetry:1-3", telemetry("x", 1, 3))
    assert unknown.status_code == 401
    nokey = httpx.post(f"{hq.url}/api/v1/ingest", content=b"", headers={**CT, "Authorization": f"Bearer {bad}"})
    assert nokey.status_code == 400 and "Idempotency-Key" in nokey.json()["message"]
    assert post(hq, good, "gw-good:telemetry:1-3", telemetry("gw-good", 1, 3)).status_code == 200
    states = {g["id"]: g for g in hq.get("/api/v1/gateways").json()}
    assert "the token is 'gw-bad''s" in states["gw-bad"]["last_error"]  # the latest refusal
    assert states["gw-good"]["last_error"] is None and states["gw-good"]["lanes"]["telemetry"]["acked"] == 3
    page = hq.get("/")
    assert page.status_code == 200 and "gw-bad" in page.text and "<script" not in page.text


def test_calls_keep_their_latest_state_and_records_their_order(hq: Hq) -> None:
    token = hq.add_gateway("gw-c")
    rows = [
        (1, "call", "btn-1", 10.0, msgpack.packb({"id": 1, "state": "open"})),
        (2, "audit", None, 10.1, msgpack.packb({"action": "call.created"})),
        (3, "call", "btn-1", 11.0, msgpack.packb({"id": 1, "state": "accepted"})),
        (4, "loss", None, 12.0, msgpack.packb({"lane": "telemetry", "first": 1, "last": 9, "count": 9})),
    ]
    assert post(hq, token, "gw-c:priority:1-4", batch.encode_outbox("gw-c", "priority", 1, rows)).status_code == 200
    calls = hq.get("/api/v1/gateways/gw-c/calls").json()
    assert calls == [{"id": 1, "state": "accepted"}]
    records = hq.get("/api/v1/gateways/gw-c/records").json()
    assert [(r["seq"], r["kind"]) for r in records] == [(1, "call"), (2, "audit"), (3, "call"), (4, "loss")]
    (gw,) = hq.get("/api/v1/gateways").json()
    assert gw["lost"] == {"telemetry": 9}
    assert hq.get("/api/v1/gateways/nope/calls").status_code == 404


def test_gateway_add_refuses_a_second_token_unless_rotated(hq: Hq) -> None:
    token = hq.add_gateway("gw-r")
    with pytest.raises(subprocess.CalledProcessError) as err:
        hq.add_gateway("gw-r")
    assert "already exists" in err.value.stderr
    rotated = subprocess.run(
        [sys.executable, "-m", "gateway", "hq", "--data-dir", str(hq.data_dir), "gateway", "add", "gw-r", "--rotate"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert rotated != token
    assert post(hq, rotated, "gw-r:telemetry:1-1", telemetry("gw-r", 1, 1)).status_code == 200


def test_the_read_api_and_status_page_want_a_reader_token(hq: Hq) -> None:
    for path in ("/api/v1/gateways", "/api/v1/gateways/x/measurements", "/"):
        refused = httpx.get(hq.url + path)
        assert refused.status_code == 401 and "bosun hq token create" in refused.json()["message"], path
        wrong = httpx.get(hq.url + path, headers={"Authorization": "Bearer " + hq.add_gateway(f"g{len(path)}")})
        assert wrong.status_code == 401, path  # a gateway's token writes, it does not read
    assert "Basic" in httpx.get(hq.url + "/").headers["www-authenticate"]  # a browser asks for it
    assert httpx.get(hq.url + "/", auth=("anyone", hq.reader())).status_code == 200
    assert httpx.get(hq.url + "/healthz").status_code == 200
    assert hq.get("/api/v1/gateways").status_code == 200


def test_a_gateway_id_sending_from_a_new_database_is_refused_not_mistaken_for_duplicates(hq: Hq) -> None:
    token = hq.add_gateway("gw-e")
    rows = [(1, "d", "m", 1.0, 1.0)]
    assert post(hq, token, "gw-e:telemetry:1-1", batch.encode_telemetry("gw-e", 1, rows, "aaaa")).status_code == 200
    again = post(hq, token, "gw-e:telemetry:1-1", batch.encode_telemetry("gw-e", 1, rows, "bbbb"))
    assert again.status_code == 409 and "another database" in again.json()["message"]
    assert "another database" in hq.get("/api/v1/gateways").json()[0]["last_error"]
    # the same database goes on as before
    more = [(2, "d", "m", 2.0, 2.0)]
    assert post(hq, token, "gw-e:telemetry:2-2", batch.encode_telemetry("gw-e", 2, more, "aaaa")).json()["stored"] == 1
