# qtl: two commands do all set-up on a fresh machine.
#   make demo   -> creates .venv with the core package (JAX; no PyTorch, no TensorFlow), trains
#                  CDL and DQC on the built-in synthetic CXR-LT, prints AUROCs
#   make demo-qvit -> the same set-up, then ViT and QViT (with and without KD) on synthetic RetinaMNIST
#   make test   -> adds the test extra (PyTorch, TensorFlow, pytest, ruff) to .venv, runs the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check
# The PyTorch build the test extra gets, installed before the extras so they keep it. For a
# CPU-only build from PyPI's default index on Linux: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
# pytest-xdist workers: one per core of the project's 2-core machines. Whole files go to one
# worker (--dist loadfile), so a file's module-scoped runs are trained once.
TEST_WORKERS ?= 2

.PHONY: demo demo-qvit test test-fast lint venv venv-test clean-demo wandb-sync

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) -e ".[test]"
	touch $(TEST_STAMP)

venv: $(STAMP)
venv-test: $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/python launch.py -m experiment=demo task=cxr8 head=cdl,dqc seed=0
	$(BIN)/python -m qtl.summary multirun/demo

demo-qvit: $(STAMP)
	$(BIN)/python launch.py -m experiment=demo_qvit model=vit,qvit distill=none,joint seed=0
	$(BIN)/python -m qtl.report.qvit multirun/demo_qvit

test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

clean-demo:
	rm -rf multirun/demo outputs/demo multirun/demo_qvit

# Upload offline W&B runs (runs without an API key, or on nodes without internet), oldest
# segment first so a requeued run's segments append to the same W&B run; already-synced
# ones are skipped by wandb.  Needs `wandb login` (or WANDB_API_KEY) once.
RUNS ?= multirun outputs
wandb-sync: $(STAMP)
	@dirs=$$(find $(RUNS) -type d -name 'offline-run-*' -path '*/wandb/*' 2>/dev/null | sort); \
	if [ -z "$$dirs" ]; then echo "no offline W&B runs under: $(RUNS)"; \
	else $(BIN)/wandb sync $$dirs; fi
