# The two commands of the README's Quickstart, `make demo` and `make test`, work on a fresh machine:
# they install what is missing first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# CPU torch from the local wheel cache on CI machines; any torch >= 2.6 already installed is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2
STAMP := .make/installed

.PHONY: install demo test bench lint clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install setuptools wheel
	$(PIP) install --no-build-isolation -e ".[test,triton]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

install: $(STAMP)

demo: install
	$(PYTHON) -m fastgpt demo

test: install
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) --durations=15 tests

# The pytest-benchmark files (one shape per op, every provider), then the `fastgpt bench --quick` sweep
# with its tables, plots and bench-results/results.json.
bench: install
	$(PYTHON) -m pytest benchmarks --benchmark-only -q -p no:cacheprovider
	$(PYTHON) -m fastgpt bench --quick --out bench-results

lint:
	$(PYTHON) -m ruff check fastgpt tests benchmarks

clean:
	rm -rf .make build *.egg-info fastgpt/*.so
