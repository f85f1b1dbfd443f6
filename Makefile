# kexue-jax: `make demo` trains the default experiment, `make test` runs the default test suite.
# Both create .venv on first use and install the package with the versions pinned in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The PyTorch peers of the speed comparison (tests/peers/): a separate venv, never used by `make test`.
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp
PIP_FLAGS := --quiet --disable-pip-version-check
# The tpu extra (libtpu, ~140 MB) in the same venv, for compiling TPU pod steps ahead of time (train_lib/pods.py).
TPU_STAMP := $(VENV)/.installed-tpu-stamp

.PHONY: install demo test test-slow test-all test-pods clean peers-venv bench-peers

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[train,text,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m train_lib.main --config=experiments/gau_lm.py:tiny --workdir=runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile -m slow

test-all: $(TPU_STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile -m "slow or not slow or pods"

$(TPU_STAMP): $(STAMP)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e '.[train,text,test,tpu]'
	touch $(TPU_STAMP)

# Compile the accelerator-sized experiments for real TPU topologies (16 and 256 chips) with libtpu, on this
# machine's CPU: they must fit HBM, shard as their rules say, and add only the expected collectives (tests/pods).
test-pods: $(TPU_STAMP)
	$(PY) -m pytest -q -n 2 --dist=loadfile -m pods tests/pods

# torch==2.13.0 first and alone: that exact pin resolves to the CPU wheel here; a looser spec can pull the
# CUDA build and its nvidia-* packages (GBs). The check after the install fails if any came in anyway.
$(PEERS_STAMP): tests/peers/constraints.txt
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install $(PIP_FLAGS) torch==2.13.0
	$(PEERS_PY) -m pip install $(PIP_FLAGS) -c tests/peers/constraints.txt FLASH-pytorch==0.1.9 diffusers numpy transformers safetensors
	@if $(PEERS_PY) -m pip list $(PIP_FLAGS) | grep -i -E '^(nvidia-|triton )'; then \
		echo "$(PEERS_VENV) has CUDA packages (above): remove $(PEERS_VENV) and install torch==2.13.0 (CPU) first"; \
		exit 1; fi
	touch $(PEERS_STAMP)

peers-venv: $(PEERS_STAMP)

# Speed against FLASH-pytorch, diffusers and transformers (tests/peers/compare.py); slow, and only meaningful on a quiet machine.
bench-peers: $(STAMP) $(PEERS_STAMP)
	$(PY) tests/peers/compare.py flash
	$(PY) tests/peers/compare.py unet
	$(PY) tests/peers/compare.py roformer
	$(PY) tests/peers/compare.py bert

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
