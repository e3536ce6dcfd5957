# The whole set-up: `make demo` and `make test` create .venv/ themselves.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Loopback only (see ARCHITECTURE.md): keep Ray on 127.0.0.1, no usage stats, no
# cloud-metadata probes, no model-hub or update look-ups. Set for test and demo only:
# the proxy variables would also stop pip from reaching the package index.
LOOPBACK_ENV := env -u RAY_ADDRESS \
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
	RAY_AUTH_MODE=disabled \
	RAY_USAGE_STATS_ENABLED=0 \
	HTTP_PROXY=http://127.0.0.1:9 \
	HTTPS_PROXY=http://127.0.0.1:9 \
	NO_PROXY=localhost,127.0.0.1,::1 \
	HF_HUB_OFFLINE=1 \
	NO_ALBUMENTATIONS_UPDATE=1

.PHONY: install browser test demo round bench gpu-check clean

install: $(STAMP)

# torch is pinned here: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,download,s3,report]'
	touch $(STAMP)

# The report's test opens it in a real browser: Debian's chromium (the machine has none).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

test: install browser
	$(LOOPBACK_ENV) $(PY) -m pytest -q --durations=25 tests

demo: install
	$(LOOPBACK_ENV) $(PY) -m pipelines.demo --output demo_output

# BLIP's Table 1 in miniature (README, "A round of CapFilt"): trains the demo's models in
# round_output/ when missing, then web / F / C / C+F from scratch over two seeds.
round: install
	$(LOOPBACK_ENV) $(PY) -m pipelines.round --output round_output

# BLIP-base shape by default (about 18 minutes on 2 cores); `make bench BENCH_ARGS="--shape small"`
# takes a few minutes. BLIP-2 OPT-2.7b and CLIP ViT-L/14 (BENCHMARKS.md gives the commands):
# `make bench BENCH_ARGS="--models blip2-opt-2.7b --dtypes bfloat16 --naive-dtype bfloat16 ..."`,
# `make bench BENCH_ARGS="--models clip-l14 ..."`.
BENCH_ARGS ?= --shape base
bench: install
	$(LOOPBACK_ENV) $(PY) -m pipelines.bench --output bench_output $(BENCH_ARGS)

# The first lent GPU's check (issue 15; BENCHMARKS.md, "GPU"): capfilt against the naive loop at the
# BLIP-base and -large shapes, decode, parity, syncs, fine-tuning and peak memory, in one JSON, in
# 8 minutes at most. It needs no install: the GPU machine has no .venv, no ray, no webdataset, so
# it runs with that machine's own python3 (with pydantic and braceexpand carried as wheels, see
# BENCHMARKS.md). On this CPU machine, at the tiny shape (a minute or two):
#   make gpu-check PY=.venv/bin/python DEVICE=cpu SHAPE=tiny
gpu-check: PY := python3
gpu-check: DEVICE ?= cuda
gpu-check: SHAPE ?= base,large
gpu-check: GPU_CHECK_OUT ?= gpu_check/gpu_check.json
gpu-check:
	$(LOOPBACK_ENV) $(PY) -m pipelines.gpu_check --device $(DEVICE) --shape $(SHAPE) --output $(GPU_CHECK_OUT)

clean:
	rm -rf demo_output bench_output .pytest_cache
