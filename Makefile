# The two set-up commands: `make demo` and `make test`.
# TORCH_SPEC picks torch; the default is the CPU wheel. CUDA users: make demo TORCH_SPEC="torch" (or their own pin).
# Everything else comes from constraints.txt, the dependency set the test suite runs on.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin
NEWEST = .venv-newest

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m nimblediff demo --out out/demo.png --overwrite

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow

# The torchao-checkpoint tests need torchao, which is kept out of the demo / test environment (importing it prints
# kernel-loading noise in every diffusers process): install it for this run only, then remove it.
test-torchao: $(BIN)/.installed
	$(BIN)/pip install -q --no-deps -c constraints.txt torchao
	$(BIN)/python -m pytest -q tests/test_quant_quanto.py; status=$$?; $(BIN)/pip uninstall -q -y torchao; exit $$status

# Report only (never fails): the suite on the newest releases requirements.txt allows, as a ComfyUI user may have.
report-newest:
	test -x $(NEWEST)/bin/python || $(PY) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install -q "$(TORCH_SPEC)"
	$(NEWEST)/bin/pip install -q --upgrade -r requirements.txt "pytest>=8"
	$(NEWEST)/bin/pip install -q --no-deps -e .
	-$(NEWEST)/bin/python -m pytest -q -m "not slow" 2>&1 | tail -n 40

# Rewrite constraints.txt from the current environment (after a deliberate upgrade; then make test).
lock: $(BIN)/.installed
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.new
	mv constraints.new constraints.txt

.PHONY: demo test test-slow test-torchao report-newest lock
