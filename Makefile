# `make demo` and `make test` set everything up in .venv (idempotent) and run.
PYTHON ?= python3
VENV := .venv
# The versions this project is tested with; override e.g. `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e '.[test,bench,export,timm]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/datd demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

bench-quick: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/decompose.py --quick
	$(VENV)/bin/python benchmarks/accuracy.py --quick

clean:
	rm -rf $(VENV) runs build src/*.egg-info
