# Bosun: `make run` starts the gateway with embedded defaults; `make test` runs the suite; `make bench` measures it.
# All three set up everything they need on a fresh Debian machine (venv, Python packages, Debian packages).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEBS := mosquitto mosquitto-clients chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench bench-uplink soak-uplink check lint types fmt clean deps venv

# Debian ships venv support separately (python3.11-venv): install it when creating the venv fails
$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3.11 python3.11-venv; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q python3.11-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

.stamp-venv: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# Debian packages the tests use: mosquitto_pub/sub as real clients, mosquitto for the benchmark baseline,
# chromium for the web UI's browser tests (Playwright drives /usr/bin/chromium; it never downloads a browser)
.stamp-debs:
	@if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto >/dev/null || ! test -x /usr/bin/chromium; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(DEBS); fi
	@touch $@

venv: .stamp-venv
deps: .stamp-venv .stamp-debs

run: .stamp-venv
	$(BIN)/bosun run $(ARGS)

test: deps
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The benchmark starts its own gateways and Mosquitto (the baseline) on free loopback ports, 1-3 minutes;
# figures also go to bench-results.json. Options: make bench ARGS="--quick" (see python -m gateway.bench --help)
bench: deps
	$(BIN)/python -m gateway.bench $(ARGS)

# Uplink: drain a 1,000,000-record backlog to a local `bosun hq` (records/s, bytes on the wire per record), ~1 min
bench-uplink: deps
	$(BIN)/python -m gateway.bench.uplink $(ARGS)

# Uplink crash soak: kill -9 of HQ and the gateway at random points over many rounds (make test runs 4 short ones)
soak-uplink: deps
	BOSUN_SOAK_ROUNDS=$${BOSUN_SOAK_ROUNDS:-30} BOSUN_SOAK_RECORDS=$${BOSUN_SOAK_RECORDS:-1000000} \
		$(BIN)/pytest -q -s -p no:cacheprovider --timeout 1800 tests/test_uplink_crash.py

lint: .stamp-venv
	$(BIN)/ruff check gateway webui tests tools
	$(BIN)/ruff format --check gateway webui tests tools

types: .stamp-venv
	$(BIN)/mypy

fmt: .stamp-venv
	$(BIN)/ruff format gateway webui tests tools
	$(BIN)/ruff check --fix gateway webui tests tools

check: lint types test

clean:
	rm -rf $(VENV) .stamp-* build *.egg-info
