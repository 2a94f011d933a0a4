# Two entry points (see README): `make demo` (the main job) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build lies on this machine's disk; elsewhere pass e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.setup-done

# --system-site-packages: on a machine whose torch is already installed (a CUDA box),
# that torch is used as it is and nothing is downloaded.
$(VENV)/.setup-done: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[test]"
	touch $@

# The main job: train the tiny DeepSeek-style model on the embedded task (~3 minutes on
# 2 CPU cores), evaluate on held-out problems, export to RUN_DIR/export.
demo: setup
	$(VENV)/bin/stalwart doctor
	$(VENV)/bin/stalwart train

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
