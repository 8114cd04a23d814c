# tuna2_jax — every target creates .venv from requirements.txt when it is missing or stale.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PARITY_VENV ?= .venv-parity
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=
STUDY_ARGS ?=
PYTEST_ARGS ?=
# Candidates for Python >= 3.12, first match wins (python3 may be 3.11, which JAX 0.11 no longer supports).
PY_CANDIDATES := python3.13 python3.12 $(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python) python3

.PHONY: demo test bench study lint golden parity clean-venv

$(VENV)/.installed: requirements.txt requirements-tpu.txt pyproject.toml
	@py=""; for c in $(PY_CANDIDATES); do \
	  if $$c -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then py=$$c; break; fi; done; \
	if [ -z "$$py" ]; then echo "error: tuna2_jax needs Python >= 3.12 (JAX 0.11). Install it (e.g. 'apt install python3.12-venv' or 'pyenv install 3.12') and rerun." >&2; exit 1; fi; \
	[ -x $(PY) ] || { echo "creating $(VENV) with $$py"; $$py -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-tpu.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import tuna2_jax, jax, flax, grain, orbax.checkpoint" 
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 tests $(PYTEST_ARGS)

demo: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(PY) -m tuna2_jax.demo --workdir=$(DEMO_DIR) $(DEMO_ARGS)

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run_all

# Tuna-2 vs Tuna-R, masking on/off, two patch sizes at equal compute (long: STUDY_ARGS="--steps=3000").
study: $(VENV)/.installed
	$(PY) -m benchmarks.study $(STUDY_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check tuna2_jax configs data launch tests benchmarks
	$(VENV)/bin/shellcheck -x launch/*.sh launch/slurm_gpu.sbatch

# Golden fixtures: random-weight HF transformers models and their outputs (needs torch; own venv).
$(PARITY_VENV)/.installed: requirements-parity.txt
	@py=""; for c in python3.11 python3.12 python3.13 python3; do \
	  if $$c -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then py=$$c; break; fi; done; \
	[ -x $(PARITY_VENV)/bin/python ] || $$py -m venv $(PARITY_VENV)
	$(PARITY_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-parity.txt 2>&1 | grep -v "is ignored" || true
	touch $@

golden: $(PARITY_VENV)/.installed
	$(PARITY_VENV)/bin/python tests/golden/make_golden.py --out=tests/golden
	$(PARITY_VENV)/bin/python tests/golden/make_golden_siglip2.py --out=tests/golden

# Live parity: regenerate the fixtures into a scratch dir with transformers, compare our import against
# them, export ours back and have transformers load the export.
parity: $(PARITY_VENV)/.installed $(VENV)/.installed
	rm -rf /tmp/tuna2_parity && mkdir -p /tmp/tuna2_parity
	$(PARITY_VENV)/bin/python tests/golden/make_golden.py --out=/tmp/tuna2_parity/golden
	$(PARITY_VENV)/bin/python tests/golden/make_golden_siglip2.py --out=/tmp/tuna2_parity/golden
	TUNA2_GOLDEN_DIR=/tmp/tuna2_parity/golden TUNA2_EXPORT_DIR=/tmp/tuna2_parity/export $(PY) -m pytest -q tests/convert
	$(PARITY_VENV)/bin/python tests/golden/check_export.py --golden=/tmp/tuna2_parity/golden --export=/tmp/tuna2_parity/export

clean-venv:
	rm -rf $(VENV) $(PARITY_VENV)
