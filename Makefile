# Set-up, training, tests, benchmarks and serving. `make setup` is idempotent: it reinstalls only
# when pyproject.toml changes. torch is pinned and installed first so nothing pulls a newer build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo train test bench serve llama-cpp clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps dashscope==2.0.2  # tests read Qwen's tiktoken ranks from it (tests/released.py)
	touch $(STAMP)

demo train: setup
	$(PY) train_qwen3.py

test: setup
	$(PY) -m pytest -q

# Every script of bench/ (the files with a main: claims_variants.py is a module that claims.py imports).
bench: setup
	for script in $$(grep -l '__main__' bench/*.py); do echo "== $$script"; $(PY) $$script || exit 1; done

serve: setup
	$(PY) serve_qwen3.py

llama-cpp: setup  # llama.cpp's tools for the GGUF tests, built once into ~/.cache/qwen3
	scripts/build-llama-cpp.sh

clean:
	rm -rf $(VENV) .cache runs
