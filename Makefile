# `make demo` / `make test` / `make bench` / `make docs` each set up .venv (Python >= 3.10) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo lint test test-fast bench docs clean

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "normfree needs Python >= 3.10; set PYTHON=python3.X")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,docs,hf,lightning]'  # docs: tests/test_docs.py builds the site; hf, lightning: the trainer adapters' tests
	touch $(INSTALLED)

# the quick BatchNorm-vs-normalizer-free grid on the bundled digits; prints its table at the end
demo: $(INSTALLED)
	$(PY) -m normfree compare --out demo-output --overwrite

# ruff (style, import order) on everything, mypy on the public API: both configured in pyproject.toml
lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m mypy

# lint, then the whole suite (what CI runs: .ci/run)
test: lint
	$(PY) -m pytest -q

# the edit-test loop: lint, then the unit tests, without the end-to-end runs, grids, studies, launches, notebook
# and docs build
test-fast: lint
	$(PY) -m pytest -q -m "not slow and not launch"

# the CPU benchmarks' table, then benchmarks/gpu.py (one skip line where there is no CUDA device)
bench: $(INSTALLED)
	$(PY) benchmarks/run.py
	$(PY) benchmarks/gpu.py

# the documentation site (mkdocs.yml, sources in docs/) into site/; tests/test_docs.py runs the same build
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) demo-output site .pytest_cache .hypothesis
