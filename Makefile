# The README's two commands: `make report` (set up the light core + the main job) and `make test`.
# One .venv for both: `make report` installs the core (what the report needs: numpy, numba, pandas,
# pyarrow, plotly, tqdm); `make test` adds the extras (torch, transformers, Jupyter, pytest, ggml-python,
# numba-cuda, ...) to the same .venv, so the report never waits for the test environment and the tests
# never need a second copy of the core. Versions come from constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.kvlab-core
FULL := $(VENV)/.kvlab-full

.PHONY: setup setup-core report test lab bench golden browser

setup-core: $(CORE)
setup: $(FULL)

$(CORE): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $(CORE)

$(FULL): $(CORE)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,hf,lab]"
	touch $(FULL)

# Headless Chromium for the browser tests (Debian's package; needs root or sudo).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

report: setup-core
	$(VENV)/bin/kvlab report --out kvlab-report.html

test: setup browser
	$(PY) -m pytest -q --nbval-lax tests notebooks; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): nothing to run"; exit 0; fi; exit $$rc

lab: setup
	$(VENV)/bin/jupyter lab notebooks

bench: setup
	$(PY) bench/cpu_quant.py

golden: setup
	bash tools/make_hadamard_golden.sh
	bash tools/build_ggml.sh
	$(PY) tools/make_golden.py
