# The README's two commands: `make report` (set up + the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvlab-installed

.PHONY: setup report test lab bench golden browser

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,hf,lab]"
	touch $(STAMP)

# Headless Chromium for the browser tests (Debian's package; needs root or sudo).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

report: setup
	$(VENV)/bin/kvlab report --out kvlab-report.html

test: setup browser
	$(PY) -m pytest -q --nbval-lax tests notebooks; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): nothing to run"; exit 0; fi; exit $$rc

lab: setup
	$(VENV)/bin/jupyter lab notebooks

bench: setup
	$(PY) bench/cpu_quant.py

golden:
	bash tools/make_hadamard_golden.sh
	bash tools/build_ggml.sh
	$(PY) tools/make_golden.py
