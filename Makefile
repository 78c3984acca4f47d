# Two entry points for a fresh machine: `make quickstart` and `make test`.
# Both create .venv on first use. torch is installed first, and only when the
# venv has none, so that pip does not pull the CUDA build as a dependency; on a
# GPU machine install your CUDA torch into .venv first and it is kept. TORCH_SPEC
# may carry pip options: "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
# Everything else is pinned by constraints.txt, so pip resolves at once. pip does not byte-compile what it installs
# (--no-compile): Python compiles the modules a run imports as it imports them, where compiling every installed
# module up front (torch, transformers, prefect: thousands never imported) took a good part of the install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# llama-cpp-python (in the dev extra) is a source distribution: pip compiles llama.cpp, once per machine (pip keeps the
# wheel). Its multimodal library, which nothing here uses, is left out: a fifth less build time (docs/gguf.md).
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: venv dev test quickstart clean-artifacts constraints

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# The project; the quickstart needs nothing more.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --no-compile $(TORCH_SPEC)
	$(PY) -m pip install --no-compile -c constraints.txt -e .
	touch $@

# And the dev extra, for the tests (S3 in moto, Ray, ...).
$(VENV)/.installed-dev: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(PY) -m pip install --no-compile -c constraints.txt -e ".[dev]"
	touch $@

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: dev
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Both flows on the embedded offline teacher; a second run reuses every finished stage.
quickstart: venv
	$(PY) -m flows run both --config quickstart

clean-artifacts:
	rm -rf artifacts

# After changing the dependencies in pyproject.toml: resolve them afresh, without the pins, and pin the result.
constraints:
	rm -rf .venv-resolve && $(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/python -m pip install $(TORCH_SPEC)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" .venv-resolve/bin/python -m pip install -e ".[dev]"
	head -3 constraints.txt > constraints.new
	.venv-resolve/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-)[=@ ]' >> constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-resolve
