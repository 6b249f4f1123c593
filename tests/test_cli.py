"""The `bosun` CLI as people run it: real subprocesses, real data dirs, a real gateway where it matters."""

from __future__ import annotations

import asyncio
import csv
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BOSUN, Paho, Running, db_rows, run_cmd, topic

PASSWORD_LINE = re.compile(r"^\s*password: (\S+)$", re.MULTILINE)
# A generated secret: at least 22 characters of base64url, i.e. at least 132 bits
STRONG = re.compile(r"[A-Za-z0-9_-]{22,}")
A_STRONG_PASSWORD = "Qm7vX2pL9sRt4KwZ8nYb3HcJ"  # 24 characters of [A-Za-z0-9]: 143 bits by our estimate
COMMANDS = ["device", "integration", "user", "token", "db", "config", "run", "simulate"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """BOSUN_* variables from the developer's shell must not leak into the subprocesses."""
    for name in list(os.environ):
        if name.startswith("BOSUN_"):
            monkeypatch.delenv(name)


def bosun(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (sync tests only; async tests use `run_cmd`)."""
    return subprocess.run(
        [*BOSUN, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def add_device(cwd: Path, data_dir: Path, device_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return bosun(
        cwd,
        "device",
        "add",
        device_id,
        "--site",
        "yacht",
        "--room",
        "c101",
        "--type",
        "button",
        "--data-dir",
        str(data_dir),
        *extra,
    )


def password_of(output: str) -> str:
    found = PASSWORD_LINE.findall(output)
    assert len(found) == 1, output
    return str(found[0])


def write_csv(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header or ("device_id", "site", "room", "type", "password"))
        writer.writerows(rows)
    return path


def device_count(data_dir: Path) -> int:
    return int(db_rows(data_dir, "SELECT count(*) FROM devices")[0][0])


# --- help --------------------------------------------------------------------------------------------------


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = bosun(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command
    assert bosun(tmp_path, "--version").returncode == 0
    assert list(tmp_path.iterdir()) == []  # --help creates no data dir


# --- device add / list -------------------------------------------------------------------------------------


def test_device_add_prints_generated_credentials_once(tmp_path: Path) -> None:
    data = tmp_path / "var"
    result = add_device(tmp_path, data, "btn-1")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s*username: btn-1$", result.stdout, re.MULTILINE), result.stdout
    secret = password_of(result.stdout)
    assert STRONG.fullmatch(secret), secret
    assert "bosun/yacht/c101/button/btn-1/" in result.stdout

    # only a salted hash is kept, and listing never shows the secret again
    stored = db_rows(data, "SELECT kind, secret_hash FROM credentials WHERE username = 'btn-1'")
    assert len(stored) == 1 and stored[0][0] == "device"
    assert secret not in stored[0][1]
    listing = bosun(tmp_path, "device", "list", "--data-dir", str(data))
    assert listing.returncode == 0, listing.stderr
    assert secret not in listing.stdout

    # every generated secret is fresh
    other = password_of(add_device(tmp_path, data, "btn-2").stdout)
    assert other != secret and STRONG.fullmatch(other)


def test_device_add_accepts_a_strong_chosen_password(tmp_path: Path) -> None:
    result = add_device(tmp_path, tmp_path / "var", "btn-1", "--password", A_STRONG_PASSWORD)
    assert result.returncode == 0, result.stderr
    assert password_of(result.stdout) == A_STRONG_PASSWORD


@pytest.mark.parametrize("weak", ["hunter2", "correcthorse", "Abc123!", "a" * 21])
def test_device_add_refuses_a_weak_password(tmp_path: Path, weak: str) -> None:
    data = tmp_path / "var"
    result = add_device(tmp_path, data, "btn-1", "--password", weak)
    assert result.returncode != 0
    assert "too weak" in result.stderr and "128 bits" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert device_count(data) == 0


def test_device_add_refuses_a_long_but_trivial_password(tmp_path: Path) -> None:
    result = add_device(tmp_path, tmp_path / "var", "btn-1", "--password", "a" * 40)
    assert result.returncode != 0


def test_device_add_refuses_a_duplicate_id(tmp_path: Path) -> None:
    data = tmp_path / "var"
    first = password_of(add_device(tmp_path, data, "btn-1").stdout)
    again = add_device(tmp_path, data, "btn-1")
    assert again.returncode != 0
    assert "btn-1 already exists" in again.stderr
    assert "password" not in again.stdout
    # the original secret is untouched
    assert db_rows(data, "SELECT count(*) FROM credentials")[0][0] == 1
    assert first


@pytest.mark.parametrize(
    ("field", "args"),
    [
        ("device_id", ["a/b", "--site", "yacht", "--room", "c101"]),
        ("device_id", ["btn+", "--site", "yacht", "--room", "c101"]),
        ("site", ["btn-1", "--site", "a/b", "--room", "c101"]),
        ("room", ["btn-1", "--site", "yacht", "--room", "c 1"]),
        ("room", ["btn-1", "--site", "yacht", "--room", "#"]),
        ("site", ["btn-1", "--site", "x" * 65, "--room", "c101"]),
    ],
)
def test_device_add_refuses_a_bad_topic_segment_naming_the_field(tmp_path: Path, field: str, args: list[str]) -> None:
    data = tmp_path / "var"
    result = bosun(tmp_path, "device", "add", *args, "--type", "button", "--data-dir", str(data))
    assert result.returncode != 0
    assert re.search(rf"\b{field} '", result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert device_count(data) == 0


def test_device_add_refuses_an_unknown_type(tmp_path: Path) -> None:
    result = bosun(
        tmp_path,
        "device",
        "add",
        "t-1",
        "--site",
        "s",
        "--room",
        "r",
        "--type",
        "toaster",
        "--data-dir",
        str(tmp_path / "var"),
    )
    assert result.returncode != 0
    assert "--type" in result.stderr and "toaster" in result.stderr


def test_device_id_may_not_reuse_an_integration_username(tmp_path: Path) -> None:
    data = tmp_path / "var"
    made = bosun(
        tmp_path,
        "integration",
        "add",
        "nodered",
        "--password",
        "node-red-secret",
        "--read",
        "bosun/#",
        "--data-dir",
        str(data),
    )
    assert made.returncode == 0, made.stderr
    result = add_device(tmp_path, data, "nodered")
    assert result.returncode != 0
    assert "already taken by an integration" in result.stderr


def test_device_list_shows_devices_and_filters(tmp_path: Path) -> None:
    data = tmp_path / "var"
    assert add_device(tmp_path, data, "btn-1").returncode == 0
    other = bosun(
        tmp_path,
        "device",
        "add",
        "sen-1",
        "--site",
        "hotel",
        "--room",
        "r2",
        "--type",
        "sensor",
        "--data-dir",
        str(data),
    )
    assert other.returncode == 0, other.stderr

    everything = bosun(tmp_path, "device", "list", "--data-dir", str(data))
    assert everything.returncode == 0, everything.stderr
    row = next(line for line in everything.stdout.splitlines() if "btn-1" in line)
    assert all(word in row for word in ("yacht", "c101", "button"))
    assert "sen-1" in everything.stdout
    assert "2 device(s)" in everything.stdout

    hotel = bosun(tmp_path, "device", "list", "--site", "hotel", "--data-dir", str(data))
    assert "sen-1" in hotel.stdout and "btn-1" not in hotel.stdout
    assert "1 device(s)" in hotel.stdout


def test_device_list_on_an_empty_data_dir(tmp_path: Path) -> None:
    result = bosun(tmp_path, "device", "list", "--data-dir", str(tmp_path / "var"))
    assert result.returncode == 0, result.stderr
    assert "0 device(s)" in result.stdout


# --- device import -----------------------------------------------------------------------------------------

TYPES = ("button", "watch", "sensor", "repeater")


def rooms(count: int, prefix: str = "dev") -> list[tuple[str, ...]]:
    """An installer's list: every other row brings its own (strong) password."""
    return [
        (
            f"{prefix}-{i:05d}",
            "yacht",
            f"c{i // 4:04d}",
            TYPES[i % 4],
            "" if i % 2 else f"{A_STRONG_PASSWORD}{i:05d}",
        )
        for i in range(count)
    ]


def test_import_3000_rows_quickly_with_credentials_file(tmp_path: Path) -> None:
    data = tmp_path / "var"
    source = write_csv(tmp_path / "rooms.csv", rooms(3000))
    creds = tmp_path / "creds.csv"
    started = time.perf_counter()
    result = bosun(tmp_path, "device", "import", str(source), "--credentials-out", str(creds), "--data-dir", str(data))
    elapsed = time.perf_counter() - started
    print(f"\nimport of 3,000 rows: {elapsed:.2f} s wall (subprocess); CLI says: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert elapsed < 15
    assert "imported 3000 device(s)" in result.stderr
    assert device_count(data) == 3000
    assert db_rows(data, "SELECT count(*) FROM credentials WHERE kind = 'device'")[0][0] == 3000

    # generated secrets go to the file, not the terminal; the file is private
    assert "written to" in result.stdout
    assert not STRONG.search(result.stdout.replace(str(creds), ""))
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    with creds.open(newline="") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == 1500
    assert {r["device_id"] for r in written} == {f"dev-{i:05d}" for i in range(1, 3000, 2)}
    assert all(STRONG.fullmatch(r["password"]) for r in written)
    assert len({r["password"] for r in written}) == 1500


def test_import_prints_generated_passwords_without_credentials_out(tmp_path: Path) -> None:
    data = tmp_path / "var"
    source = write_csv(tmp_path / "rooms.csv", rooms(4))
    result = bosun(tmp_path, "device", "import", str(source), "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    printed = list(csv.DictReader(result.stdout.splitlines()))
    assert [r["device_id"] for r in printed] == ["dev-00001", "dev-00003"]
    assert all(STRONG.fullmatch(r["password"]) for r in printed)
    assert A_STRONG_PASSWORD not in result.stdout  # chosen passwords are not echoed
    assert device_count(data) == 4


def test_import_is_all_or_nothing_and_names_the_line(tmp_path: Path) -> None:
    data = tmp_path / "var"
    good = rooms(10)
    bad = [*good[:6], ("dev-bad", "yacht", "c1", "toaster", ""), *good[6:]]
    result = bosun(tmp_path, "device", "import", str(write_csv(tmp_path / "rooms.csv", bad)), "--data-dir", str(data))
    assert result.returncode != 0
    assert "rooms.csv:8:" in result.stderr and "toaster" in result.stderr, result.stderr  # header is line 1
    assert "Traceback" not in result.stderr
    assert device_count(data) == 0

    # the last row of a large file being bad also leaves nothing behind
    big = [*rooms(3000), ("dev-x", "a/b", "c1", "button", "")]
    result = bosun(tmp_path, "device", "import", str(write_csv(tmp_path / "big.csv", big)), "--data-dir", str(data))
    assert result.returncode != 0
    assert "big.csv:3002:" in result.stderr and "site" in result.stderr, result.stderr
    assert device_count(data) == 0


@pytest.mark.parametrize(
    ("row", "words"),
    [
        (("w-1", "yacht", "c1", "watch", "hunter2"), ["too weak"]),
        (("", "yacht", "c1", "watch", ""), ["device_id"]),
        (("w-1", "yacht", "", "watch", ""), ["room"]),
    ],
)
def test_import_bad_row_kinds(tmp_path: Path, row: tuple[str, ...], words: list[str]) -> None:
    data = tmp_path / "var"
    result = bosun(
        tmp_path,
        "device",
        "import",
        str(write_csv(tmp_path / "r.csv", [*rooms(2), row])),
        "--data-dir",
        str(data),
    )
    assert result.returncode != 0
    assert "r.csv:4:" in result.stderr, result.stderr
    assert all(w in result.stderr for w in words), result.stderr
    assert device_count(data) == 0


def test_import_refuses_a_missing_column(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "r.csv", [("d-1", "yacht", "c1")], header=("device_id", "site", "room"))
    result = bosun(tmp_path, "device", "import", str(source), "--data-dir", str(tmp_path / "var"))
    assert result.returncode != 0
    assert "missing column(s) type" in result.stderr


def test_import_refuses_duplicates_in_the_file_and_in_the_registry(tmp_path: Path) -> None:
    data = tmp_path / "var"
    twice = [*rooms(3), rooms(3)[1]]
    result = bosun(tmp_path, "device", "import", str(write_csv(tmp_path / "twice.csv", twice)), "--data-dir", str(data))
    assert result.returncode != 0
    assert "twice.csv:5:" in result.stderr and "dev-00001 appears twice" in result.stderr, result.stderr
    assert device_count(data) == 0

    assert add_device(tmp_path, data, "dev-00002").returncode == 0
    result = bosun(tmp_path, "device", "import", str(write_csv(tmp_path / "r.csv", rooms(5))), "--data-dir", str(data))
    assert result.returncode != 0
    assert "already registered: dev-00002" in result.stderr, result.stderr
    assert device_count(data) == 1

    # importing the same file twice: the second run is refused as a whole
    fresh = tmp_path / "fresh"
    source = write_csv(tmp_path / "again.csv", rooms(5))
    assert bosun(tmp_path, "device", "import", str(source), "--data-dir", str(fresh)).returncode == 0
    again = bosun(tmp_path, "device", "import", str(source), "--data-dir", str(fresh))
    assert again.returncode != 0 and "already registered" in again.stderr
    assert device_count(fresh) == 5


def test_import_line_number_counts_blank_lines(tmp_path: Path) -> None:
    source = tmp_path / "r.csv"
    source.write_text("device_id,site,room,type,password\nx-1,s,r,button,\n\nx-2,s,r,toaster,\n")
    result = bosun(tmp_path, "device", "import", str(source), "--data-dir", str(tmp_path / "var"))
    assert result.returncode != 0
    assert "r.csv:4:" in result.stderr, result.stderr  # the bad row is on line 4 of the file


def test_import_credentials_out_replaces_a_readable_file_privately(tmp_path: Path) -> None:
    creds = tmp_path / "creds.csv"
    creds.write_text("stale\n")
    creds.chmod(0o644)
    result = bosun(
        tmp_path,
        "device",
        "import",
        str(write_csv(tmp_path / "r.csv", rooms(2))),
        "--credentials-out",
        str(creds),
        "--data-dir",
        str(tmp_path / "var"),
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600


def test_import_with_an_unwritable_credentials_out_registers_nothing(tmp_path: Path) -> None:
    data = tmp_path / "var"
    result = bosun(
        tmp_path,
        "device",
        "import",
        str(write_csv(tmp_path / "r.csv", rooms(2))),
        "--credentials-out",
        str(tmp_path / "missing-dir" / "creds.csv"),
        "--data-dir",
        str(data),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "creds.csv" in result.stderr
    assert not (data / "bosun.db").exists() or device_count(data) == 0


# --- integrations, users, tokens (against a running gateway) -----------------------------------------------


async def test_integration_account_works_within_its_patterns(gateway: Running, paho_clients) -> None:
    data = str(gateway.data_dir)
    result = await run_cmd(
        *BOSUN,
        "integration",
        "add",
        "nodered",
        "--password",
        "node-red-secret",
        "--read",
        "bosun/yacht/#",
        "--write",
        "bosun/yacht/c101/button/btn-1/cmd/ping",
        "--data-dir",
        data,
    )
    assert result.returncode == 0, result.stderr
    assert b"integration nodered: read bosun/yacht/#" in result.stdout
    await gateway.gw.accounts.refresh()
    device_password = await gateway.add_device("btn-1")

    nodered: Paho = paho_clients(gateway.mqtt_port, "nodered", "nodered", "node-red-secret")
    assert await asyncio.to_thread(nodered.connect) == 0
    wrong: Paho = paho_clients(gateway.mqtt_port, "nodered-2", "nodered", "not-the-secret")
    assert await asyncio.to_thread(wrong.connect) == 5

    # MQTT 3.1.1 section 3.9.3: 0x80 is the SUBACK failure return code
    inside = await asyncio.to_thread(nodered.subscribe, "bosun/yacht/c101/#", 1)
    assert inside in ([0], [1]), inside
    for outside in ("bosun/hotel/#", "bosun/#", "#", "other/topic"):
        assert await asyncio.to_thread(nodered.subscribe, outside, 1) == [0x80], outside

    # it reads what a device publishes inside its pattern
    device: Paho = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", device_password)
    assert await asyncio.to_thread(device.connect) == 0
    await asyncio.to_thread(device.publish, topic("btn-1", "heartbeat"), "", 1)
    assert await asyncio.to_thread(nodered.got_message.wait, 5)
    assert [m.topic for m in nodered.messages] == [topic("btn-1", "heartbeat")]

    # and writes only where it may: the refused publish is sent first, so receiving the allowed one proves it
    assert await asyncio.to_thread(device.subscribe, topic("btn-1", "cmd/#"), 1) in ([0], [1])
    await asyncio.to_thread(nodered.publish, topic("btn-1", "cmd/reset"), "{}", 1)
    await asyncio.to_thread(nodered.publish, topic("btn-1", "cmd/ping"), "{}", 1)
    assert await asyncio.to_thread(device.got_message.wait, 5)
    await asyncio.sleep(0.2)
    assert [m.topic for m in device.messages] == [topic("btn-1", "cmd/ping")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nr", "--password", "short", "--read", "bosun/#"], "at least 12 characters"),
        (["nr", "--password", "long-enough-secret", "--read", "bosun/#/x"], "not a valid MQTT topic filter"),
        (["n/r", "--password", "long-enough-secret", "--read", "bosun/#"], "integration name"),
    ],
)
def test_integration_add_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    data = tmp_path / "var"
    result = bosun(tmp_path, "integration", "add", *args, "--data-dir", str(data))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert db_rows(data, "SELECT count(*) FROM credentials")[0][0] == 0


def test_integration_add_refuses_a_taken_username(tmp_path: Path) -> None:
    data = tmp_path / "var"
    assert add_device(tmp_path, data, "btn-1").returncode == 0
    result = bosun(
        tmp_path,
        "integration",
        "add",
        "btn-1",
        "--password",
        "long-enough-secret",
        "--read",
        "bosun/#",
        "--data-dir",
        str(data),
    )
    assert result.returncode != 0
    assert "already taken" in result.stderr


def test_integration_add_requires_read(tmp_path: Path) -> None:
    result = bosun(
        tmp_path,
        "integration",
        "add",
        "nr",
        "--password",
        "long-enough-secret",
        "--data-dir",
        str(tmp_path / "var"),
    )
    assert result.returncode != 0
    assert "--read" in result.stderr


async def test_crew_user_token_reads_the_api_but_may_not_register(gateway: Running) -> None:
    data = str(gateway.data_dir)
    made = await run_cmd(
        *BOSUN, "user", "add", "alice", "--role", "crew", "--password", "alice-password", "--data-dir", data
    )
    assert made.returncode == 0, made.stderr
    assert b"user alice (crew) created" in made.stdout
    assert b"password" not in made.stdout  # she chose it; nothing to show

    issued = await run_cmd(*BOSUN, "token", "create", "--user", "alice", "--label", "tablet", "--data-dir", data)
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.decode().strip()
    assert re.fullmatch(r"\S{32,}", token), token

    await gateway.add_device("btn-1")
    async with gateway.http(token) as client:
        listed = await client.get("/api/v1/devices")
        assert listed.status_code == 200, listed.text
        assert [d["device_id"] for d in listed.json()] == ["btn-1"]
        refused = await client.post(
            "/api/v1/devices", json={"device_id": "btn-2", "site": "yacht", "room": "c101", "type": "button"}
        )
        assert refused.status_code == 403, refused.text
    assert gateway.rows("SELECT device_id FROM devices") == [("btn-1",)]

    async with gateway.http("bsn_not-a-real-token") as client:
        assert (await client.get("/api/v1/devices")).status_code == 401


async def test_admin_user_token_may_register(gateway: Running) -> None:
    data = str(gateway.data_dir)
    made = await run_cmd(*BOSUN, "user", "add", "boss", "--role", "admin", "--data-dir", data)
    assert made.returncode == 0, made.stderr
    assert len(password_of(made.stdout.decode())) >= 10  # generated and shown once
    issued = await run_cmd(*BOSUN, "token", "create", "--user", "boss", "--data-dir", data)
    assert issued.returncode == 0, issued.stderr
    async with gateway.http(issued.stdout.decode().strip()) as client:
        created = await client.post(
            "/api/v1/devices", json={"device_id": "btn-2", "site": "yacht", "room": "c101", "type": "button"}
        )
    assert created.status_code == 201, created.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["user", "add", "bob", "--role", "crew", "--password", "short"], "at least 10 characters"),
        (["user", "add", "bob", "--role", "captain", "--password", "long-password"], "captain"),
        (["user", "add", "b/b", "--role", "crew", "--password", "long-password"], "user name"),
        (["token", "create", "--user", "nobody"], "user nobody does not exist"),
    ],
)
def test_user_and_token_refuse_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    data = tmp_path / "var"
    result = bosun(tmp_path, *args, "--data-dir", str(data))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_user_add_refuses_a_duplicate(tmp_path: Path) -> None:
    data = str(tmp_path / "var")
    args = ["user", "add", "bob", "--role", "crew", "--password", "long-password", "--data-dir", data]
    assert bosun(tmp_path, *args).returncode == 0
    again = bosun(tmp_path, *args)
    assert again.returncode != 0
    assert "user bob already exists" in again.stderr


# --- db check ----------------------------------------------------------------------------------------------


def test_db_check_reports_integrity_and_counts(tmp_path: Path) -> None:
    data = tmp_path / "var"
    assert add_device(tmp_path, data, "btn-1").returncode == 0
    assert add_device(tmp_path, data, "btn-2").returncode == 0
    result = bosun(tmp_path, "db", "check", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert "integrity ok" in result.stdout
    counts = dict(re.findall(r"^\s+(\w+)\s+(\d+)$", result.stdout, re.MULTILINE))
    assert counts["devices"] == "2"
    assert counts["credentials"] == "2"
    assert counts["measurements"] == "0"


def test_db_check_without_a_database_fails_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    result = bosun(tmp_path, "db", "check", "--data-dir", str(missing))
    assert result.returncode != 0
    assert "no database" in result.stderr
    assert not missing.exists()


async def test_db_check_while_the_gateway_runs(gateway: Running) -> None:
    await gateway.add_device("btn-1")
    result = await run_cmd(*BOSUN, "db", "check", "--data-dir", str(gateway.data_dir))
    assert result.returncode == 0, result.stderr
    assert b"integrity ok" in result.stdout
    assert re.search(rb"^\s+devices\s+1$", result.stdout, re.MULTILINE)
    # the running gateway keeps the measurements index beside the database: checked too
    assert re.search(rb"^measurements index .*bosun-index\.db: integrity ok, 0 entries", result.stdout, re.MULTILINE)


def test_db_check_names_a_damaged_measurements_index_without_failing(tmp_path: Path) -> None:
    """The index is derived data the gateway rebuilds at start: a damaged one is reported, the check still passes."""
    data = tmp_path / "var"
    assert add_device(tmp_path, data, "btn-1").returncode == 0
    (data / "bosun-index.db").write_bytes(b"not a database at all" * 100)
    result = bosun(tmp_path, "db", "check", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert "integrity ok" in result.stdout
    assert re.search(r"^measurements index .*: damaged \(.*\): the gateway rebuilds it", result.stdout, re.MULTILINE)


# --- --config and the environment --------------------------------------------------------------------------

EVERY_COMMAND = [
    ["run"],
    ["device", "add", "btn-1", "--site", "s", "--room", "r", "--type", "button"],
    ["device", "list"],
    ["device", "import", "rooms.csv"],
    ["integration", "add", "nr", "--password", "long-enough-secret", "--read", "bosun/#"],
    ["user", "add", "bob", "--role", "crew", "--password", "long-password"],
    ["token", "create", "--user", "bob"],
    ["db", "check"],
    ["config", "show"],
    ["simulate", "--duration", "1"],
]


@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda a: " ".join(a[:2]))
def test_every_command_refuses_a_bad_config_naming_the_key(tmp_path: Path, argv: list[str]) -> None:
    write_csv(tmp_path / "rooms.csv", rooms(1))
    bad = tmp_path / "bosun.toml"
    bad.write_text('[mqtt]\nport = "abc"\n')
    result = bosun(tmp_path, *argv, "--config", str(bad), "--data-dir", str(tmp_path / "var"))
    assert result.returncode != 0
    assert "mqtt.port" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "var").exists()  # nothing was touched


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ("[mqtt]\nrooot = 'x'\n", "mqtt.rooot: unknown key"),
        ("[nosuch]\n", "nosuch: unknown section"),
        ("[mqtt\n", "not valid TOML"),
    ],
)
def test_config_errors_are_explained(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bosun.toml"
    path.write_text(text)
    result = bosun(tmp_path, "config", "show", "--config", str(path))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    result = bosun(tmp_path, "db", "check", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode != 0
    assert "nope.toml does not exist" in result.stderr


def test_config_file_data_dir_is_used_and_the_flag_wins(tmp_path: Path) -> None:
    from_file = tmp_path / "from-file"
    path = tmp_path / "bosun.toml"
    path.write_text(f'[gateway]\ndata_dir = "{from_file}"\n')
    added = bosun(
        tmp_path,
        "device",
        "add",
        "btn-1",
        "--site",
        "s",
        "--room",
        "r",
        "--type",
        "button",
        "--config",
        str(path),
    )
    assert added.returncode == 0, added.stderr
    assert device_count(from_file) == 1

    flag = tmp_path / "from-flag"
    added = add_device(tmp_path, flag, "btn-2", "--config", str(path))
    assert added.returncode == 0, added.stderr
    assert device_count(flag) == 1 and device_count(from_file) == 1


def test_environment_overrides_config_show(tmp_path: Path) -> None:
    path = tmp_path / "bosun.toml"
    path.write_text("[mqtt]\nroot = 'fromfile'\n")
    plain = bosun(tmp_path, "config", "show")
    assert plain.returncode == 0, plain.stderr
    assert "mqtt.root = 'bosun'" in plain.stdout
    assert "[BOSUN_MQTT_ROOT]" in plain.stdout

    overridden = bosun(tmp_path, "config", "show", env={"BOSUN_MQTT_ROOT": "obedio"})
    assert "mqtt.root = 'obedio'" in overridden.stdout

    # precedence: file over defaults, environment over file
    assert "mqtt.root = 'fromfile'" in bosun(tmp_path, "config", "show", "--config", str(path)).stdout
    both = bosun(tmp_path, "config", "show", "--config", str(path), env={"BOSUN_MQTT_ROOT": "obedio"})
    assert "mqtt.root = 'obedio'" in both.stdout

    # and it reaches the commands: the topic prefix a new device is told to use
    added = add_device(tmp_path, tmp_path / "var", "btn-1")
    assert "bosun/yacht/c101/button/btn-1/" in added.stdout
    added = bosun(
        tmp_path,
        "device",
        "add",
        "btn-2",
        "--site",
        "yacht",
        "--room",
        "c101",
        "--type",
        "button",
        "--data-dir",
        str(tmp_path / "var"),
        env={"BOSUN_MQTT_ROOT": "obedio"},
    )
    assert "obedio/yacht/c101/button/btn-2/" in added.stdout


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    result = bosun(tmp_path, "config", "show", env={"BOSUN_MQTT_PORT": "abc"})
    assert result.returncode != 0
    assert "BOSUN_MQTT_PORT" in result.stderr, result.stderr


# --- the CLI while the gateway runs (WAL) ------------------------------------------------------------------


async def test_device_added_while_running_can_connect(gateway: Running, paho_clients) -> None:
    result = await run_cmd(
        *BOSUN,
        "device",
        "add",
        "btn-7",
        "--site",
        "yacht",
        "--room",
        "c101",
        "--type",
        "button",
        "--data-dir",
        str(gateway.data_dir),
    )
    assert result.returncode == 0, result.stderr
    secret = password_of(result.stdout.decode())
    await gateway.gw.accounts.refresh()

    device: Paho = paho_clients(gateway.mqtt_port, "btn-7", "btn-7", secret)
    assert await asyncio.to_thread(device.connect) == 0
    await asyncio.to_thread(device.publish, topic("btn-7", "heartbeat"), "", 1)
    assert await gateway.wait_for("SELECT topic FROM traffic WHERE topic = ?", (topic("btn-7", "heartbeat"),))

    listed = await run_cmd(*BOSUN, "device", "list", "--data-dir", str(gateway.data_dir))
    assert listed.returncode == 0, listed.stderr
    assert b"btn-7" in listed.stdout


async def test_gateway_picks_up_cli_changes_without_help(gateway: Running, paho_clients) -> None:
    """No in-process refresh: the gateway's own 1 s registry poll must notice the CLI's commit."""
    result = await run_cmd(
        *BOSUN,
        "device",
        "add",
        "btn-8",
        "--site",
        "yacht",
        "--room",
        "c101",
        "--type",
        "button",
        "--data-dir",
        str(gateway.data_dir),
    )
    assert result.returncode == 0, result.stderr
    secret = password_of(result.stdout.decode())
    for _ in range(50):  # up to 5 s: a few poll periods
        if gateway.gw.accounts.get("btn-8") is not None:
            break
        await asyncio.sleep(0.1)
    device: Paho = paho_clients(gateway.mqtt_port, "btn-8", "btn-8", secret)
    assert await asyncio.to_thread(device.connect) == 0


async def test_import_while_running_and_imported_devices_connect(
    gateway: Running, paho_clients, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "rooms.csv", rooms(3000))
    creds = tmp_path / "creds.csv"
    started = time.perf_counter()
    result = await run_cmd(
        *BOSUN,
        "device",
        "import",
        str(source),
        "--credentials-out",
        str(creds),
        "--data-dir",
        str(gateway.data_dir),
    )
    elapsed = time.perf_counter() - started
    print(f"\nimport of 3,000 rows while the gateway runs: {elapsed:.2f} s; CLI says: {result.stderr.decode().strip()}")
    assert result.returncode == 0, result.stderr
    assert elapsed < 15
    assert gateway.rows("SELECT count(*) FROM devices") == [(3000,)]
    await gateway.gw.accounts.refresh()

    with creds.open(newline="") as handle:
        generated = next(csv.DictReader(handle))
    one = paho_clients(gateway.mqtt_port, generated["device_id"], generated["device_id"], generated["password"])
    assert await asyncio.to_thread(one.connect) == 0
    chosen = paho_clients(gateway.mqtt_port, "dev-00000", "dev-00000", f"{A_STRONG_PASSWORD}00000")
    assert await asyncio.to_thread(chosen.connect) == 0


def test_config_show_hides_secrets(tmp_path: Path) -> None:
    shown = bosun(tmp_path, "config", "show", env={"BOSUN_UPLINK_TOKEN": "hq-secret-token-123"})
    assert shown.returncode == 0, shown.stderr
    assert "hq-secret-token-123" not in shown.stdout
    assert "uplink.token = '<set, not shown>'" in shown.stdout
    assert "uplink.url = ''" in shown.stdout  # other values are shown as they are
