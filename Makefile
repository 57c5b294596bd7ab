# The two set-up commands: `make demo` (the cats-vs-dogs recipe on bundled sample data)
# and `make test` (the whole test suite). Both create .venv/ when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv proto lint bench clean fuzz

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m caffeport.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup tests

# Regenerate caffeport/proto/caffe_pb2.py from proto/caffe.proto (a test fails when it is stale).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=caffeport/proto proto/caffe.proto

lint: $(STAMP)
	$(VENV)/bin/ruff check caffeport tests bench

# Long fuzz run (FUZZ_SECONDS, FUZZ_SEED): prints tried/clean/crash/hang/memory/unnamed, failures in fuzz_failures.json.
FUZZ_SECONDS ?= 600
FUZZ_SEED ?= 1
fuzz: $(STAMP)
	$(PY) -m tests.fuzz.fuzz_runner --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED) --json fuzz_failures.json

# Quick engines side by side (5 nets, batch 1 and 16, 3 rounds) + every bench/bench_*.py;
# `make bench BENCH_ARGS=--full` for the full side by side (cold start, RSS, ResNet-50 profile).
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo_out
