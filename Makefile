# Quick start: `make demo`, `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench notebooks clean

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install when pyproject.toml changes.
$(VENV)/.installed-demo: pyproject.toml | $(PY)
	$(PIP) install -e '.[demo]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install -e '.[test,parity,demo,notebooks]'
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) -m optax_paged demo $(ARGS)

# OPTAX_PAGED_REQUIRE_PARITY makes a missing torch/bitsandbytes a failure
# instead of a skip: the parity tests must run here and in CI. --nbmake runs
# the notebooks as tests too; -n 2 runs two pytest workers (CI has 2 cores;
# TEST_WORKERS=0 runs in one process).
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	OPTAX_PAGED_REQUIRE_PARITY=1 $(PY) -m pytest -n $(TEST_WORKERS) --nbmake tests notebooks $(ARGS)

# Re-run the notebooks in place so their committed copies show their outputs.
notebooks: $(VENV)/.installed-test
	$(PY) notebooks/execute.py

bench: $(VENV)/.installed-test
	$(PY) benchmarks/step_time.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
