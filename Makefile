# meshgate — every target sets up what it needs on a fresh machine.
#   make run    start the gateway on the quickstart config with two demo backends
#   make test   lint, format check and the whole test suite
#   make bench  benchmarks beside nginx (installs nginx and wrk when missing)

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	&& { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean redis-server

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "meshgate needs Python >= 3.11 (python3.11 or newer on PATH)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

run: setup
	$(BIN)/python -m gateway.quickstart examples/quickstart/

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint redis-server
	$(BIN)/python -m pytest -q

# The rate-limit tests start a real redis-server; install it when it is missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	if [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	else echo "make test needs redis-server: install it (apt-get install redis-server) or run as root"; exit 1; fi; \
	$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y redis-server; }

bench: setup
	bash loadtest/bench.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
