# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
DEMO_STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: test demo docs lint format bench clean-venv

$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP): $(DEMO_STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(DOCS_STAMP): $(DEMO_STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

# Pretrain the tiny model on the built-in scenes (a few minutes on 2 cores), probe it against a random init,
# print the table and write runs/tiny-synthetic/loss_curve.png. Re-running resumes / reuses the finished run.
demo: $(DEMO_STAMP)
	$(PY) -m aimv2 demo

test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

# The documentation site (docs/, mkdocs.yml) into site/, every warning an error. The generated reference pages are
# checked against the code by tests/test_docs.py; `python docs/gen_pages.py` rewrites them.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The benchmark suite on this machine (CPU: about 6-8 minutes on 2 cores): encoder inference vs timm and
# transformers, training steps vs a plain baseline (samples/s, MFU), data pipeline vs torchvision, native vs fixed
# resolution, peak memory of each; prints one table of every ratio. JSON in benchmarks/results/suite_cpu/.
# Options: make bench BENCH_ARGS="--only train,data" (see python benchmarks/run_all.py --help).
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check src tests benchmarks docs/*.py
	$(VENV)/bin/ruff format --check src tests benchmarks docs/*.py

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks docs/*.py
	$(VENV)/bin/ruff check --fix src tests benchmarks docs/*.py

clean-venv:
	rm -rf $(VENV)
