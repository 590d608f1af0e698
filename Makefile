# The two commands of the README: `make demo` and `make test`.
# Each installs what it needs (scripts/bootstrap.sh is idempotent).
VENV := .venv
PY := $(VENV)/bin/python
export METERKEYS_HOME ?= $(CURDIR)/var

.PHONY: setup demo test lint unit serve bench clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/meterkeys demo

lint: setup
	$(VENV)/bin/ruff check lifecycle tasks flows deployments simulator cli hes_adapters tests bench
	$(VENV)/bin/mypy lifecycle tasks flows deployments simulator cli hes_adapters bench

test: lint
	$(PY) -m pytest -q -ra --durations=15 -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder tests

serve: setup
	$(VENV)/bin/meterkeys serve

bench: setup
	$(PY) bench/import_bench.py --meters 100000 --workers 2

clean:
	rm -rf var var-simulation
