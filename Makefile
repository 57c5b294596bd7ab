# The two set-up commands: `make demo` (the cats-vs-dogs recipe on bundled sample data)
# and `make test` (the whole test suite). Both create .venv/ when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv proto lint bench clean fuzz gpu-prep

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

# What bench/gpu_check.sh needs on a lent GPU machine, into .device/ (git-ignored; carry it): the
# goldens and ResNet-50's prototxt (../shared does not travel) and wheels of lmdb and protobuf for
# that machine's Python 3.12 (it has neither at the versions caffeport needs).
RESNET50_DIR := corpus/3_model_zoo/resnet_KaimingHe/prototxt
gpu-prep: $(STAMP)
	rm -rf .device && mkdir -p .device/shared/$(RESNET50_DIR) .device/whl
	cp -r ../shared/golden .device/shared/
	cp ../shared/$(RESNET50_DIR)/ResNet-50-deploy.prototxt .device/shared/$(RESNET50_DIR)/
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .device/whl lmdb==3.0.0 protobuf==7.36.2

clean:
	rm -rf $(VENV) demo_out .device
