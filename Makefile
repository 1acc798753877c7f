# The two set-up commands: `make demo` and `make test`.
# TORCH_SPEC picks torch; the default is the CPU wheel. CUDA users: make demo TORCH_SPEC="torch" (or their own pin).
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m nimblediff demo --out out/demo.png

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow

.PHONY: demo test test-slow
