# The whole set-up: `make demo` and `make test` create .venv/ themselves.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Loopback only (see ARCHITECTURE.md): keep Ray on 127.0.0.1, no usage stats,
# no cloud-metadata probes, no model-hub or update look-ups.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HTTP_PROXY := http://127.0.0.1:9
export HTTPS_PROXY := http://127.0.0.1:9
export NO_PROXY := localhost,127.0.0.1,::1
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
unexport RAY_ADDRESS

.PHONY: install test demo clean

install: $(STAMP)

# torch is pinned here: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m pipelines.demo --output demo_output

clean:
	rm -rf demo_output .pytest_cache
