# Two entry points: `make demo` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.zerotune-installed

.PHONY: demo test test-all venv lint clean bytecode

venv: $(STAMP)

# No NVIDIA GPU: install the CPU build of torch first, so that nothing pulls the CUDA build.
# With a GPU: the normal (CUDA) build from the index.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install 'torch>=2.4'; \
	else \
	    $(PY) -m pip install torch==2.13.0 || \
	    $(PY) -m pip install torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install setuptools wheel
	$(PY) -m pip install --no-build-isolation -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Byte-compile zerotune's own modules (the editable install does not, and where
# PYTHONDONTWRITEBYTECODE is set every CLI, supervisor and engine start would compile them
# again: about 0.15 s each). Up-to-date files are skipped.
bytecode: $(STAMP)
	$(PY) -m compileall -q engine tui >/dev/null

demo: bytecode
	$(VENV)/bin/zerotune run profiles/demo.yaml

test: bytecode
	$(PY) -m pytest -q

test-all: bytecode
	ZEROTUNE_SLOW=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check engine tui tests bench

clean:
	rm -rf $(VENV)
