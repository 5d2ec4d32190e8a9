# The commands people type. Each creates .venv on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The exact torch build. CPU here; on a GPU machine e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell echo '$(TORCH)' | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install test test-fast demo experiment bench bench-gpu lint format clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[all]"
	rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/cpt demo --workdir demo $(ARGS)

experiment: $(STAMP)
	$(BIN)/cpt experiment --workdir demo $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m tests.bench $(ARGS)

# cpt train with FSDP2 + bf16 on every visible GPU (a tiny CPU config when there is none); see tests/bench/bench_gpu.py
bench-gpu: $(STAMP)
	$(BIN)/python -m tests.bench gpu

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check setup.py pipelines trainer shared tests
	$(BIN)/hadolint docker/pipeline.Dockerfile docker/trainer.Dockerfile

format: $(STAMP)
	$(BIN)/ruff format setup.py pipelines trainer shared tests
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
