# The README's two commands are `make demo` and `make test`; each sets up the venv on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines pin the CPU torch; on a GPU machine install your CUDA torch first and use
# `make setup CONSTRAINTS=` (empty) so pip keeps it.
CONSTRAINTS ?= constraints/cpu.txt
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup test test-fast lint format demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# Unit tests only (no Ray, DeepSpeed, S3 server or subprocess): under a minute.
test-fast: setup
	$(PY) -m pytest -q -m "not integration" $(PYTEST_ARGS)

# ruff (settings in pyproject.toml): CI fails on any finding or unformatted file.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: setup
	$(VENV)/bin/clippy-ray demo --config configs/demo.yaml $(DEMO_ARGS)

bench: setup
	$(PY) bench/loss_memory.py
	$(PY) bench/throughput.py
	$(PY) bench/profile_step.py
	$(PY) bench/step_overhead.py
	$(PY) bench/layers.py
	$(PY) bench/host_ops.py --config configs/vitb16_t5base.yaml --batch 4 --threads 1 \
		'model.image.timm_kwargs={embed_dim: 64, num_heads: 2}' model.embed_dim=64 model.image.img_size=64 \
		'model.text.hf_config={num_layers: 12, num_heads: 2, d_model: 64, d_kv: 32, d_ff: 128, vocab_size: 512}'
	$(PY) bench/ingest.py
	$(PY) bench/eval_scaling.py
	$(PY) bench/eval_during_training.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
