# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# compat mode puts the checkout itself on sys.path, so Twisted finds the
# drop-ins under twisted/plugins/ without a reinstall after each edit.
# setuptools warns that the mode is transitional on every install; the
# build-system range in pyproject.toml keeps a release that has it, so the
# warning is only noise here.
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install --quiet \
		-e '.[test]' --config-settings editable_mode=compat

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" ./bin/demo

test: install
	$(BIN)/python -m pytest

# certs/dev/ holds the demo's PKI; removing it makes the next demo create a new one.
clean:
	rm -rf $(VENV) build dist *.egg-info certs/dev
