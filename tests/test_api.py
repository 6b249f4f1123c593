"""The JSON API over real HTTP: device CRUD, roles, JSON errors, health, metrics, schema."""

from __future__ import annotations

import asyncio

from conftest import Running, topic

from gateway.store import registry


async def _token(gateway: Running, user: str, role: str) -> str:
    await gateway.gw.writer.run(lambda c: registry.add_user(c, user, role, "a-good-password", "test"))
    return str(await gateway.gw.writer.run(lambda c: registry.create_token(c, user, None, "test")))


async def test_device_crud_returns_credentials_once(gateway: Running, paho_clients) -> None:
    async with gateway.http() as http:
        created = await http.post(
            "/api/v1/devices",
            json={
                "device_id": "btn-5",
                "site": "yacht",
                "room": "c105",
                "type": "button",
                "name": "Owner's cabin",
            },
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["credentials"]["username"] == "btn-5" and len(body["credentials"]["password"]) >= 22
        client = paho_clients(gateway.mqtt_port, "btn-5", "btn-5", body["credentials"]["password"])
        assert await asyncio.to_thread(client.connect) == 0

        read = (await http.get("/api/v1/devices/btn-5")).json()
        assert "credentials" not in read and read["name"] == "Owner's cabin"
        assert "password" not in str(read)

        listed = (await http.get("/api/v1/devices", params={"room": "c105"})).json()
        assert [d["device_id"] for d in listed] == ["btn-5"]
        assert (await http.get("/api/v1/devices", params={"room": "nowhere"})).json() == []
        online = (await http.get("/api/v1/devices", params={"online": "false"})).json()
        assert [d["device_id"] for d in online] == ["btn-5"]

        moved = await http.put("/api/v1/devices/btn-5", json={"room": "c106"})
        assert moved.status_code == 200 and moved.json()["room"] == "c106"
        # a moved device is disconnected (its namespace changed) and must reconnect
        assert await asyncio.to_thread(client.disconnected.wait, 5)

        assert (await http.delete("/api/v1/devices/btn-5")).status_code == 204
        missing = await http.get("/api/v1/devices/btn-5")
        assert missing.status_code == 404
        assert missing.json()["message"] == "device btn-5 does not exist"
    actions = [r[0] for r in gateway.rows("SELECT action FROM audit_log WHERE target = 'btn-5' ORDER BY id")]
    assert actions == ["device.add", "device.update", "device.delete"]


async def test_errors_are_json_with_a_message(gateway: Running) -> None:
    async with gateway.http() as http:
        bad = await http.post("/api/v1/devices", json={"device_id": "a/b", "site": "s", "room": "r", "type": "button"})
        assert bad.status_code == 400 and "device_id" in bad.json()["message"]
        weak = await http.post(
            "/api/v1/devices",
            json={"device_id": "x1", "site": "s", "room": "r", "type": "button", "password": "password123"},
        )
        assert weak.status_code == 400 and "too weak" in weak.json()["message"]
        wrong_type = await http.post(
            "/api/v1/devices", json={"device_id": "x1", "site": "s", "room": "r", "type": "toaster"}
        )
        assert wrong_type.status_code == 400 and "type" in wrong_type.json()["message"]
        malformed = await http.post("/api/v1/devices", content=b"{nope", headers={"content-type": "application/json"})
        assert malformed.status_code == 400 and malformed.json()["message"]
        extra = await http.post(
            "/api/v1/devices",
            json={"device_id": "x1", "site": "s", "room": "r", "type": "button", "root": True},
        )
        assert extra.status_code == 400
        await http.post("/api/v1/devices", json={"device_id": "x1", "site": "s", "room": "r", "type": "button"})
        again = await http.post("/api/v1/devices", json={"device_id": "x1", "site": "s", "room": "r", "type": "button"})
        assert again.status_code == 409 and "already exists" in again.json()["message"]
        too_many = await http.get("/api/v1/devices/x1/measurements", params={"limit": 100_001})
        assert too_many.status_code == 400
        unknown_cmd = await http.post("/api/v1/devices/ghost/command", json={"name": "reset"})
        assert unknown_cmd.status_code == 404


async def test_roles_are_enforced(gateway: Running) -> None:
    crew = await _token(gateway, "alice", "crew")
    installer = await _token(gateway, "ivan", "installer")
    device = {"device_id": "b1", "site": "s", "room": "r", "type": "button"}
    async with gateway.http(token=None) as anonymous:
        for path in ("/api/v1/devices", "/api/v1/events", "/api/v1/traffic", "/metrics"):
            response = await anonymous.get(path)
            assert response.status_code == 401, path
            assert "token" in response.json()["message"]
        assert (await anonymous.get("/healthz")).status_code == 200
    async with gateway.http(token="bsn_forged") as forged:
        assert (await forged.get("/api/v1/devices")).status_code == 401
    async with gateway.http(token=crew) as http:
        assert (await http.get("/api/v1/devices")).status_code == 200
        assert (await http.get("/api/v1/events")).status_code == 200
        denied = await http.post("/api/v1/devices", json=device)
        assert denied.status_code == 403 and "crew" in denied.json()["message"]
        assert (await http.get("/api/v1/traffic")).status_code == 403
    async with gateway.http(token=installer) as http:
        assert (await http.post("/api/v1/devices", json=device)).status_code == 201
        assert (await http.post("/api/v1/devices/b1/command", json={"name": "identify"})).status_code == 202
        assert (await http.get("/api/v1/traffic")).status_code == 200


async def test_measurements_limit_and_since(gateway: Running) -> None:
    await gateway.add_device("s1", type_="sensor")
    rows = [("s1", "t", 1_800_000_000.0 + i, float(i)) for i in range(10)]
    await gateway.gw.writer.run(
        lambda c: c.executemany("INSERT INTO measurements(device_id, metric, ts, value) VALUES (?,?,?,?)", rows)
    )
    async with gateway.http() as http:
        latest = (await http.get("/api/v1/devices/s1/measurements", params={"limit": 3})).json()
        assert [r["value"] for r in latest] == [7.0, 8.0, 9.0]
        since = (
            await http.get("/api/v1/devices/s1/measurements", params={"since": 1_800_000_002.0, "limit": 2})
        ).json()
        assert [r["value"] for r in since] == [2.0, 3.0]
        assert set(since[0]) == {"ts", "metric", "value"}


async def test_traffic_filter_uses_mqtt_wildcards(gateway: Running, paho_clients) -> None:
    password = await gateway.add_device("btn-1")
    client = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", password)
    await asyncio.to_thread(client.connect)
    for action in ("heartbeat", "status", "press"):
        await asyncio.to_thread(client.publish, topic("btn-1", action), "{}", 1)
    async with gateway.http() as http:
        everything = (await http.get("/api/v1/traffic")).json()
        assert [r["topic"].rsplit("/", 1)[1] for r in everything] == ["press", "status", "heartbeat"]
        one = (await http.get("/api/v1/traffic", params={"topic": "bosun/+/+/+/btn-1/status"})).json()
        assert [r["topic"] for r in one] == [topic("btn-1", "status")]
        exact = (await http.get("/api/v1/traffic", params={"topic": topic("btn-1", "press"), "limit": 1})).json()
        assert len(exact) == 1 and exact[0]["payload"] == "{}"
        invalid = await http.get("/api/v1/traffic", params={"topic": "bosun/#/x"})
        assert invalid.status_code == 400


async def test_health_metrics_and_offline_schema(gateway: Running) -> None:
    async with gateway.http() as http:
        health = (await http.get("/healthz")).json()
        assert health["status"] == "ok"
        assert set(health["components"]) == {"store", "broker", "ingest", "calls", "api"}
        assert health["index"]["behind_rows"] >= 0 and health["index"]["used_bytes"] > 0
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        for name in (
            "bosun_mqtt_connected_clients",
            "bosun_writer_batch_size_bucket",
            "bosun_writer_commit_seconds_bucket",
            "bosun_writer_queue_depth",
            "bosun_ingest_queue_depth",
            "bosun_index_behind_rows",
        ):
            assert name in metrics.text, name
        schema = await http.get("/schema/openapi.json")
        assert schema.status_code == 200 and "/api/v1/devices" in schema.json()["paths"]
        page = await http.get("/schema")
        assert "cdn" not in page.text.lower() and "<script" not in page.text.lower()
