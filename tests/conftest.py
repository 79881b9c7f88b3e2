"""Fixtures shared by several test modules."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Import-only flash_attn stand-in (OpenRLHF imports it at module level); at the end, so a real one wins.
sys.path.append(str(Path(__file__).resolve().parents[1] / "gold_plugin" / "testing" / "stubs"))


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray for the module, unless one is already running (then it is left as found)."""
    import ray

    started = not ray.is_initialized()
    if started:
        # vLLM engines in Ray actors run in the actor's own process (no engine-core and worker processes of their
        # own, each importing vLLM again): a replica starts in seconds instead of half a minute.
        in_process_vllm = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=in_process_vllm)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def pretrained_pair():
    """SmolLM2-135M-Instruct (student) and Gemma-3-270M base (teacher) from their PyPI packages, prepared once per
    machine into the user cache (``gold_plugin.pretrained``: about 2 minutes the first time, a checksum pass after)."""
    from gold_plugin.pretrained import prepare_pretrained_pair

    return prepare_pretrained_pair()


def content_cache(name: str, sources: list[str]) -> Path:
    """A folder under the user cache named by a hash of ``sources`` (files or folders of this repository, read in
    full) and the torch and transformers versions: what is built there from those sources is reused by later runs on
    this machine until one of them changes."""
    import torch
    import transformers

    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for source in sources:
        path = REPO / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes())
    root = Path(os.environ.get("GOLD_TEST_CACHE") or Path.home() / ".cache" / "gold_plugin" / "tests")
    return root / f"{name}-{digest.hexdigest()[:16]}"


@pytest.fixture(scope="session")
def demo_models():
    """The demo's teacher and student (``gold_plugin.demo.prepare.prepare_models``: about a minute and a half of
    training), kept in a cache folder named by the hash of the code that trains them."""
    import torch
    from filelock import FileLock

    from gold_plugin.demo.prepare import prepare_models

    torch.set_num_threads(2)
    sources = ["gold_plugin/demo", "gold_plugin/local/modeling.py", "gold_plugin/packaged_tokenizers.py"]
    folder = content_cache("demo_models", sources)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):  # test workers (pytest -n) build it once, one after the other
        return prepare_models(folder)


def pytest_collection_modifyitems(config, items):
    """The ``ray job submit`` runs (marker ``e2e``, one file: the longest part of the suite) first: with test workers
    (``pytest -n 2 --dist loadfile --no-loadscope-reorder``, as ``make test`` runs) one worker takes them at once
    while the other runs the rest."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)
