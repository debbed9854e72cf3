PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install tools docker-tools images compose-test dev stack test lint typecheck bench bench-cache bench-vault reliability soak clean

# Two distributions from this checkout: secrets-client (client/: schemas, events, secrets_client)
# and secrets-service (the service, which depends on it). devstack/ is importable from here only.
$(STAMP): pyproject.toml client/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./client -e '.[dev]'
	@# hatch's editable install of secrets-client also copies its force-included packages into
	@# site-packages, where they would shadow the checkout (the .pth) with stale copies.
	$(BIN)/python -c "import shutil, sysconfig; [shutil.rmtree(sysconfig.get_paths()['purelib'] + '/' + p, ignore_errors=True) for p in ('schemas', 'events', 'secrets_client')]"
	touch $(STAMP)

install: $(STAMP) tools

# prometheus and promtool (make test checks the rules and a real /metrics with promtool; make
# stack runs Prometheus) and docker-compose (make test has it check compose/, which needs no
# engine): Debian's packages, installed when missing (root, as CI).
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "promtool not found: apt-get install -y prometheus"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q prometheus >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }; }
	@command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || { \
	  echo "docker compose not found: apt-get install -y --no-install-recommends docker-compose"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && \
	      apt-get install -y -q --no-install-recommends docker-compose >/dev/null; }; }

dev: $(STAMP)
	$(BIN)/secrets-service dev

# Three OpenBao Raft nodes and three NATS nodes (TLS), three instances over HTTPS, Prometheus
# with deploy/prometheus/: devstack/production.py. Prints the URLs and tokens; Ctrl-C stops it.
stack: $(STAMP) tools
	$(BIN)/python -m devstack.production

SOURCES := service events schemas secrets_client devstack tests bench examples

# ruff, then the layer rules of pyproject.toml's [tool.importlinter] (import-linter).
lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

# SECRETS_TEST_CONTAINERS=1 make test: OpenBao and nats-server as containers (tests/servers.py),
# with an engine answering (dockerd started, and stopped after, when none runs) and the local
# images built first: devstack/containers.py. Without it, no Docker is involved.
TEST_IMAGES ?= openbao,nats
TEST_RUNNER := $(if $(filter 1,$(SECRETS_TEST_CONTAINERS)),$(BIN)/python -m devstack.containers run --images=$(TEST_IMAGES) --)

test: $(STAMP) tools $(if $(filter 1,$(SECRETS_TEST_CONTAINERS)),docker-tools) lint typecheck
	SECRETS_TEST_REQUIRE_SERVERS=1 $(TEST_RUNNER) $(BIN)/pytest -m "not slow"

# Every scenario of RELIABILITY.md, the long variants included (30 s of writers, 500
# schemathesis examples); measured figures go to bench/results/reliability.jsonl.
RELIABILITY_TESTS := tests/reliability/test_reliability_cluster.py tests/reliability/test_reliability_faults.py \
	tests/reliability/test_hostile_tokens.py tests/reliability/test_hostile_input.py tests/reliability/test_schemathesis.py \
	tests/integration/test_jwks_refresh.py tests/integration/test_vault_http.py tests/integration/test_server.py tests/integration/test_https.py \
	tests/integration/test_listing.py tests/integration/test_bus_security.py tests/integration/test_nats_auth.py \
	tests/unit/service/auth/test_oidc_refresh.py tests/unit/service/vault/test_backend.py tests/unit/service/http/test_protocol.py \
	tests/unit/service/http/test_serving.py tests/unit/service/core/test_listing.py tests/unit/schemas/test_globs.py \
	tests/unit/service/core/test_coherence.py tests/unit/events/test_bus.py \
	tests/integration/test_rotation_cluster.py tests/integration/test_rotation_crash.py \
	tests/integration/test_watch_cluster.py tests/integration/test_vault_ha.py \
	tests/reliability/test_reliability_poller.py tests/integration/test_poller.py \
	tests/integration/test_compose_openbao.py
reliability: $(STAMP)
	rm -f bench/results/reliability.jsonl
	RELIABILITY_FIGURES=bench/results/reliability.jsonl $(BIN)/pytest $(RELIABILITY_TESTS)

# Minutes at 80% of the measured maximum throughput; figures in bench/results/soak.json.
soak: $(STAMP)
	$(BIN)/python bench/soak.py

# The service side by side with OpenBao (needs wrk; installs it with apt-get when root).
# Writes bench/results/latest.{json,md}; fails when cached reads are not ahead of OpenBao.
bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-cache: $(STAMP)
	$(BIN)/python bench/cache_bench.py --writes 1000

# The Vault clients side by side against a real OpenBao (aiohttp, the former hand-written
# client taken from git, hvac in a thread), rounds interleaved; bench/results/vault_client.json.
bench-vault: $(STAMP)
	$(BIN)/python bench/vault_client_bench.py

# Containers (devstack/containers.py): Debian's Docker engine, docker-compose and mmdebstrap,
# installed when missing (root, as CI). A dockerd is started when none answers, and stopped after.
docker-tools:
	@command -v dockerd >/dev/null 2>&1 && command -v mmdebstrap >/dev/null 2>&1 && \
	  { command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; } || { \
	  echo "installing docker.io docker-compose mmdebstrap"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q docker.io docker-compose mmdebstrap >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q docker.io docker-compose mmdebstrap >/dev/null; }; }

# The local images: a Debian base (mmdebstrap), OpenBao, NATS and Prometheus from the binaries the
# tests run, and the service from ./Dockerfile on that base.
images: $(STAMP) tools docker-tools
	$(BIN)/python -m devstack.containers images

# compose/docker-compose.yml for real on the local images (host network, loopback only): OIDC
# tokens, a write read back through another instance, a rotation, Prometheus; then `down -v`,
# checking that no container, network or volume is left.
compose-test: $(STAMP) tools docker-tools
	$(BIN)/python -m devstack.compose_test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
