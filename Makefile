# Two commands work on a fresh machine with nothing but Python 3.11:
#   make demo   the main job on the built-in synthetic world: train, distill, export, evaluate
#   make test   run the test suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# a CPU-only torch from the public index: make TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# torch first and pinned: 2.13.0 is the local CPU wheel; an unpinned torch pulls CUDA builds.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cascade run configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
