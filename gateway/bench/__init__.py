"""`python -m gateway.bench` (`make bench`): the gateway's performance figures, with Mosquitto as the baseline.

Modules: `mqtt` (a minimal MQTT 3.1.1 packet codec), `loadgen` (asyncio client connections without a Task per
message), `procs` (the gateway and Mosquitto as subprocesses, CPU and RSS from /proc), `probes` (the gateway's
/metrics histogram, the live-bus SSE stream, stored rows read from SQLite), `scenarios` (durable ingest and
relay), `report` (table, chart, JSON), `runner` (the whole run), `cli` (options).
"""
