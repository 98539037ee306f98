# qtl: two commands do all set-up on a fresh machine.
#   make demo   -> creates .venv, trains CDL and DQC on the built-in synthetic CXR-LT, prints AUROCs
#   make demo-qvit -> the same set-up, then ViT and QViT (with and without KD) on synthetic RetinaMNIST
#   make test   -> creates .venv (with the torch and tf extras the tests need), runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-qvit test test-fast lint venv clean-demo wandb-sync

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch.py -m experiment=demo task=cxr8 head=cdl,dqc seed=0
	$(BIN)/python -m qtl.summary multirun/demo

demo-qvit: $(STAMP)
	$(BIN)/python launch.py -m experiment=demo_qvit model=vit,qvit distill=none,joint seed=0
	$(BIN)/python -m qtl.report.qvit multirun/demo_qvit

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
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
