# `make demo` and `make test` do all set-up on a fresh machine: they create .venv when it is
# missing and install the package with the pinned CPU-capable torch before running.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/orca-lora run configs/quickstart.yaml

# on pytest-xdist workers, one per core (4 at most); `make test TEST_PARALLEL=` runs the suite in one process
TEST_PARALLEL ?= -n auto --maxprocesses 4 --dist worksteal

test: $(STAMP)
	$(PY) -m pytest -q $(TEST_PARALLEL) --durations=15

bench: $(STAMP)
	for script in bench/bench_*.py; do $(PY) $$script || exit 1; done

clean-runs:
	rm -rf runs
