# The README's two commands: `make demo` (set up, run the main job on the built-in default) and
# `make test` (set up, run the test suite). Both create ./.venv on first use; nothing else is needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) train.py
	$(PY) infer.py --checkpoint runs/tiny/model --prompt "The for statement" --max-new-tokens 48

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadscope tests

clean:
	rm -rf $(VENV) runs .pytest_cache
