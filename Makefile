# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv on first use (torch==2.13.0 pinned first: a CPU wheel, no CUDA download).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.polytask-installed

.PHONY: demo test

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]" torch==2.13.0
	# LibMTL (a peer in the balancer tests) without its torchvision requirement: its weighting
	# classes need only torch, and a torchvision wheel for another torch build breaks on import
	$(PY) -m pip install -q --no-deps LibMTL==1.1.5
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/polytask demo
	$(VENV)/bin/polytask demo --merge --overwrite

test: $(STAMP)
	$(PY) -m pytest
