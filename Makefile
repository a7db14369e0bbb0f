# meshgate — every target sets up what it needs on a fresh machine.
#   make run    start the gateway on the quickstart config with two demo backends
#   make test   lint, format check and the whole test suite
#   make bench  benchmarks beside nginx (installs nginx, wrk and h2load when missing)
#               e.g. make bench SCENARIOS=plain,h2tls DUR=2 ROUNDS=1
#   make loadtest    locust scenarios against a local gateway (reports in loadtest/results/)
#   make microbench  pytest-benchmark timings of the router, JWT stage and local limiter

# The interpreter for .venv: the first of these that is Python 3.11 or newer and can
# make a venv. The distribution's own CPython (/usr/bin) comes first: Debian and
# Ubuntu build it with profile-guided and link-time optimisation and link it
# statically, and meshgate's request path costs 7-12 % less CPU on it than on a
# pyenv build made without those (docs/performance.md, "The interpreter").
# `make setup PYTHON=python3.12` (after `make clean`) picks another.
PYTHON ?= $(shell for p in /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11 \
	python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 \
	&& $$p -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench loadtest microbench clean redis-server

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

# Settings such as `make bench SCENARIOS=plain DUR=2` reach the scripts through the
# environment (make exports command-line variables); docs/benchmarks.md and
# docs/loadtest.md list them.
bench: setup
	bash loadtest/bench.sh

loadtest: setup redis-server
	$(BIN)/python loadtest/run_loadtest.py

microbench: setup
	$(BIN)/python -m pytest -q tests/benchmarks --benchmark-enable \
		--benchmark-columns=min,median,mean,stddev,rounds --benchmark-sort=name \
		--benchmark-autosave --benchmark-storage=loadtest/results/microbench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The container image the helm chart runs (Dockerfile), tagged with the package version.
IMAGE ?= meshgate
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
CONTAINER_BUILDER ?= $(shell for b in docker podman buildah; do \
	command -v $$b >/dev/null 2>&1 && { echo $$b; break; }; done)

.PHONY: image
image:
	@test -n "$(CONTAINER_BUILDER)" || { echo "make image needs a container builder:" \
	"docker, podman or buildah on PATH (or CONTAINER_BUILDER=...); none was found"; exit 1; }
	@$(CONTAINER_BUILDER) info >/dev/null 2>&1 || { echo "$(CONTAINER_BUILDER) is on PATH" \
	"but cannot build here (is its engine running? see: $(CONTAINER_BUILDER) info)"; exit 1; }
	$(CONTAINER_BUILDER) build -t $(IMAGE):$(IMAGE_TAG) .
