# BiomedGPT platform. `make install` makes .venv (torch first, then the project with its dev extras);
# `make demo` runs the whole platform path on local Ray; `make test` runs the test suite;
# `make bench` runs the benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.13.0
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
# Local Ray must register and dial 127.0.0.1 only (see FIELD_NOTES): set before ray is imported.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install system-packages demo test bench clean

install: system-packages $(VENV)/.installed

# Debian packages the project needs (Java for METEOR, kubectl for manifest tests), listed in
# .ci/apt-packages.txt; only missing ones are installed.
system-packages:
	@missing=""; \
	for p in $$(grep -vE '^\s*(#|$$)' .ci/apt-packages.txt 2>/dev/null); do \
	  dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# torch is installed first and pinned: a loose requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/biomedgpt demo

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=40   # two workers, whole modules each; the slowest tests listed: the suite must stay under 35 min on 2 cores

bench: install
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/serve_load.py

clean:
	rm -rf $(VENV) .pytest_cache
