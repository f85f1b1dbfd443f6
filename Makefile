# kexue-jax: `make demo` trains the default experiment, `make test` runs the default test suite.
# Both create .venv on first use and install the package with the versions pinned in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-slow test-all clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m train_lib.main --config=experiments/gau_lm.py:tiny --workdir=runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile -m "slow or not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
