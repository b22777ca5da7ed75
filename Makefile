# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
DEMO_STAMP := $(VENV)/.installed

.PHONY: test demo lint format bench clean-venv

$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP): $(DEMO_STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Pretrain the tiny model on the built-in scenes (a few minutes on 2 cores), probe it against a random init,
# print the table and write runs/tiny-synthetic/loss_curve.png. Re-running resumes / reuses the finished run.
demo: $(DEMO_STAMP)
	$(PY) -m aimv2 demo

test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

# The benchmark suite on this machine (CPU: about 6-8 minutes on 2 cores): encoder inference vs timm and
# transformers, training steps vs a plain baseline (samples/s, MFU), data pipeline vs torchvision, native vs fixed
# resolution, peak memory of each; prints one table of every ratio. JSON in benchmarks/results/suite_cpu/.
# Options: make bench BENCH_ARGS="--only train,data" (see python benchmarks/run_all.py --help).
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean-venv:
	rm -rf $(VENV)
