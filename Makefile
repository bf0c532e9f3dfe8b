# One-command set-up on a fresh Linux machine with only Python >= 3.11:
#   make run   -- create .venv, install genmlx[cpu], run the main job
#   make test  -- create .venv, install genmlx[cpu,dev], run the test suite
# Installs are stamped, so repeated runs skip pip until pyproject.toml changes.
# BACKEND picks MLX's Linux backend extra: cpu (default) or cuda (NVIDIA GPU); on macOS
# the extra installs nothing. Changing it on an existing .venv needs `make clean-venv`.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PYTEST_ARGS ?=
BACKEND ?= cpu

.PHONY: run test venv clean-venv

run: $(VENV)/.stamp-run
	$(VENV)/bin/genmlx train experiments/digits_vae.toml --run-dir runs/digits_vae

# pytest exit code 5 means "no tests collected": that is a failure here.
test: $(VENV)/.stamp-dev
	@$(VPY) -c 'import sys, genmlx, mlx.core as mx; print(f"Python {sys.version.split()[0]}, MLX {mx.__version__}; {genmlx.describe_blas()}")'
	@$(VPY) -m pytest -q -rs --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

venv: $(VPY)

$(VPY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "genmlx needs Python >= 3.11; run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

$(VENV)/.stamp-run: pyproject.toml | $(VPY)
	$(VPY) -m pip install --quiet -e ".[$(BACKEND)]"
	touch $@

$(VENV)/.stamp-dev: pyproject.toml | $(VPY)
	$(VPY) -m pip install --quiet -e ".[$(BACKEND),dev]"
	touch $@ $(VENV)/.stamp-run

clean-venv:
	rm -rf $(VENV)
