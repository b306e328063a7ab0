# Quick start targets. Both create ./.venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: install demo test test-compile test-ray test-cluster test-schema test-browser browser bench serve

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the local CPU wheel; on a GPU machine install your CUDA torch first.
# The stamp file makes repeated `make test` skip the install until pyproject.toml changes.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[face,serve,dev,provenance]"
	$(BIN)/pip install -q --no-deps "insightface>=0.7.3" "facenet-pytorch==2.6.0" "invisible-watermark==0.2.0"
	# The identity scorer (dlib-bin + face-recognition-models, from the `face` extra) must work.
	$(BIN)/python -c "from avatar_engine.faces.scoring import DlibScorer; print('face scorer:', DlibScorer().name)"
	touch $@

demo: install
	$(BIN)/avatar-engine generate "portrait of an astronaut, studio light" --style professional --seed 42 -o $(OUT)

# The import contracts (.importlinter: the layers of avatar_engine/ and serve/, no serve/Ray/HTTP in the
# library), then the default suite (store, API, webhooks, engine; SQLite and PostgreSQL) without Ray.
test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# Whole-UNet compile checks (marker `compile`, ~14 minutes on 2 cores): mixed traffic, adapter reloads, style LoRAs
# varying within and across batches, step caching and InstantID on `compile_scope: full` never recompile after
# warm-up (no-codegen backend on CPU).
test-compile: install
	$(BIN)/python -m pytest -q -m compile

# The end-to-end tests against a real Ray Serve app on 127.0.0.1 (marker `ray`).
test-ray: install
	$(BIN)/python -m pytest -q -m ray

# The multi-node test (marker `cluster`): `ray start` head + worker nodes with custom resources,
# `serve deploy`, PostgreSQL and an S3-compatible store (moto) on 127.0.0.1, a node killed.
test-cluster: install
	$(BIN)/python -m pytest -q -m cluster

# Schema fuzzing: schemathesis against /v1/openapi.json, app served by uvicorn on 127.0.0.1 (marker `schema`).
test-schema: install
	$(BIN)/python -m pytest -q -m schema

# The web studio in a real browser (marker `browser`): Debian's Chromium driven by Playwright
# (Playwright's own browser download cannot work offline), against the app on 127.0.0.1.
# Screenshots: out/studio-browser/.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test-browser: install browser
	AVATAR_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q -m browser

bench: install
	$(BIN)/python benchmarks/engine_throughput.py

serve: install
	$(BIN)/avatar-serve run
