# mqtt-affinity developer targets. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
PY    := .venv/bin/python

.PHONY: all bootstrap lint test test-unit bench demo clean

all: test

bootstrap:
	bash scripts/bootstrap.sh

# ruff on everything, mypy --strict on agent/ (settings in pyproject.toml).
lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy

# Lint, then the whole suite: unit tests plus real Redis, mosquitto, HAProxy 2.6 and 3.2.
test: lint
	$(PY) -m pytest -q

# No external processes (no HAProxy, Redis, brokers or agent).
test-unit:
	$(PY) -m pytest -q -m "not integration"

bench: bootstrap
	$(PY) bench/spop_load.py
	$(PY) bench/connect_storm.py

demo: bootstrap
	$(PY) scripts/demo.py

clean:
	rm -rf .haproxy .pytest_cache .hypothesis build .demo
	rm -f *.so  # the mypyc group library of a build run in place (setup.py)
	find agent -name '*.so' -delete
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
