# vla-train developer commands. `make demo` and `make test` work on a fresh machine: they install first if needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: help install test test-fast demo lint format clean
.DEFAULT_GOAL := help

help:
	@echo "make install  - create $(VENV) and install vla-train (editable) with test extras"
	@echo "make demo     - run the embedded end-to-end demo on CPU"
	@echo "make test     - run the whole test suite"
	@echo "make lint     - ruff"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest tests

DEMO_BASE := runs/base-vlms/tiny-dinosiglip+tiny-llama

demo: install
	$(PY) vla-scripts/make_demo_data.py --data_root runs/demo_data
	test -f $(DEMO_BASE)/checkpoints/latest-checkpoint.pt || \
		$(PY) vla-scripts/make_base_vlm.py --model.type tiny-dinosiglip+tiny-llama --run_dir $(DEMO_BASE)
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 vla-scripts/train.py --vla.type tiny-demo \
		--data_root_dir runs/demo_data --run_root_dir runs --trackers '[jsonl]'

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache
