"""`bosun simulate`: guests press, watches answer like crew, and the whole call loop reaches the gateway."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import BOSUN, Running, db_rows, db_write, run_cmd

from gateway.cli import _revoke_sim_token, _sim_token
from gateway.simulate import Ledger, parse_range
from gateway.store import registry


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2-20", (2.0, 20.0)), ("0.1-0.3", (0.1, 0.3)), ("5", (5.0, 5.0)), ("0-0", (0.0, 0.0))],
)
def test_parse_range(text: str, expected: tuple[float, float]) -> None:
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["20-2", "a-b", "", "-1", "1-x"])
def test_parse_range_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_range(text)


def test_ledger_matches_a_call_to_the_press_that_made_it() -> None:
    ledger = Ledger()
    for at in (100.0, 110.0, 120.0):
        ledger.pressed("btn-1", at)
    # the call was stamped at 110.02: the press sent at 110.0 made it, not the later one
    notify = {"call_id": 7, "state": "new", "device_id": "btn-1", "created_at": 110.02}
    ledger.watch_notified(notify, at=110.05)
    ledger.watch_notified({**notify, "state": "escalated"}, at=170.0)  # the first notify counts
    ledger.button_told({"call_id": 7, "state": "received", "created_at": 110.02}, "btn-1", at=110.04)
    ledger.button_told({"call_id": 7, "state": "accepted", "created_at": 110.02}, "btn-1", at=113.0)
    ledger.watch_notified({**notify, "state": "completed"}, at=118.0)
    seen = ledger.calls["7"]
    assert seen.press_at == 110.0
    assert seen.first_notify_at == 110.05
    assert seen.button_accepted_at == 113.0
    assert seen.accepted and seen.completed
    figures = ledger.figures()
    assert figures["calls notified to watches"] == 1
    assert figures["calls accepted"] == 1 and figures["calls completed"] == 1
    assert figures["watch notifies new/escalated/taken"] == "1/1/0"
    assert figures["buttons told received/accepted/done"] == "1/1/0"
    assert figures["press to 1st notify ms, p50 / p90"] == "50.0 / 50.0 (n=1)"
    assert figures["press to button accepted s, p50 / p90"] == "3.0 / 3.0 (n=1)"


def test_ledger_without_a_matching_press_has_no_latency() -> None:
    ledger = Ledger()
    ledger.pressed("btn-1", 200.0)  # after the call was created: a press of another run or another call
    ledger.watch_notified({"call_id": 1, "state": "new", "device_id": "btn-1", "created_at": 150.0}, at=150.1)
    ledger.watch_notified({"call_id": "x", "state": "new"}, at=1.0)  # no device, no created_at
    ledger.watch_notified({"state": "new"}, at=1.0)  # no call id: not a call
    figures = ledger.figures()
    assert figures["calls notified to watches"] == 2
    assert figures["press to 1st notify ms, p50 / p90"] == "-"


def test_stats_token_goes_to_the_least_privileged_user_and_is_revoked(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    assert db_write(data_dir, _sim_token) is None  # nobody to mint one for
    db_write(data_dir, lambda c: registry.add_user(c, "root", "admin", "long-password", "test"))
    db_write(data_dir, lambda c: registry.add_user(c, "deck", "crew", "long-password", "test"))
    token = db_write(data_dir, _sim_token)
    assert db_write(data_dir, lambda c: registry.lookup_token(c, token)).username == "deck"
    db_write(data_dir, lambda c: _revoke_sim_token(c, token))
    assert db_write(data_dir, lambda c: registry.lookup_token(c, token)) is None
    actions = db_rows(data_dir, "SELECT actor, action, target FROM audit_log WHERE action LIKE 'token.%' ORDER BY id")
    assert actions == [("simulate", "token.create", "deck"), ("simulate", "token.revoke", "deck")]


async def test_bad_delay_range_is_refused(tmp_path: Path) -> None:
    result = await run_cmd(*BOSUN, "simulate", "--data-dir", str(tmp_path / "var"), "--accept-delay", "9-1")
    assert result.returncode == 2
    assert b"--accept-delay" in result.stderr and b"low <= high" in result.stderr


async def test_simulated_crew_accepts_and_completes_calls(gateway: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """10 devices (5 buttons in 2 rooms, 1 watch): presses become calls the watch accepts and completes."""
    monkeypatch.setenv("COLUMNS", "160")  # rich sizes its table to this: one line per figure
    result = await run_cmd(
        *BOSUN,
        "simulate",
        "--data-dir",
        str(gateway.data_dir),
        "--mqtt-port",
        str(gateway.mqtt_port),
        "--http-port",
        str(gateway.gw.http_port),
        "--devices",
        "10",
        "--rate",
        "10",
        "--duration",
        "4",
        "--press-share",
        "0.3",
        "--accept-delay",
        "0.1-0.3",
        "--done-delay",
        "0.1-0.3",
        "--ignore",
        "0",
        "--decline",
        "0",
        "--seed",
        "4",
        timeout=60,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()

    calls = gateway.rows("SELECT state, accepted_by, completed_by FROM calls")
    received = gateway.rows("SELECT count(*) FROM call_notifies WHERE role = 'watch' AND received_at IS NOT NULL")[0][0]
    assert len(calls) >= 2, out
    completed = [c for c in calls if c[0] == "completed"]
    assert len(completed) >= 2, (calls, out)
    assert all(c[1] == c[2] == "device:sim-wat-0008" for c in completed)
    assert received >= len(completed)  # the watch's `received` receipts were recorded

    def figure(name: str) -> str:
        found = re.search(rf"│ {re.escape(name)}\s*│\s*(.+?) │", out)
        assert found, f"{name!r} not in\n{out}"
        return found.group(1).strip()

    assert int(figure("calls completed")) >= 1
    assert int(figure("calls accepted")) >= int(figure("calls completed"))
    assert figure("device errors") == "0"
    assert "n=" in figure("press to button accepted s, p50 / p90")
    # the stats came from the gateway's API with a token minted for the run and revoked after it
    assert int(figure("gateway calls since the start")) == len(calls)
    assert gateway.rows("SELECT revoked FROM api_tokens WHERE label LIKE 'bosun simulate%'") == [(1,)]
