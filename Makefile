# Two entry points for a newcomer: `make demo` (train on the built-in digits and write a
# sample grid) and `make test`. Both create .venv and install from nothing when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Eight simulated CPU devices, so sharding code paths run on a laptop-class machine.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR ?= runs/demo

.PHONY: install test test-all demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Two workers, one test file each at a time (module-scoped compiled fixtures stay shared).
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -x -q -n 2 --dist loadfile -m "not slow" --durations=25

# Everything, the slow whole-training-run modules too (about twice as long).
test-all: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -x -q -n 2 --dist loadfile

demo: $(STAMP)
	bash scripts/demo.sh $(WORKDIR)

bench: $(STAMP)
	$(PY) benchmarks/bench_train_step.py --config small
	$(PY) benchmarks/bench_sampling.py

clean:
	rm -rf $(VENV) build *.egg-info
