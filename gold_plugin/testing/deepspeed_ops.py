"""Build DeepSpeed's CPU ops that an OpenRLHF job on CPU loads (FusedAdam and the shared-memory comm op) into
torch's extension cache, so that a job finds them built.

Test scaffolding (``tests/test_openrlhf_e2e.py``): on a fresh ``.venv`` (the cache is keyed by the build command,
which names the venv's path) the first job would otherwise build them itself, a few minutes of compilation inside
that job's start, next to whatever else the machine runs. ``python -m gold_plugin.testing.deepspeed_ops``.
"""

from __future__ import annotations

import subprocess
import sys

OPS = ("FusedAdamBuilder", "ShareMemCommBuilder")


def build() -> None:
    """Load (building where the cache lacks them) each op of :data:`OPS` with DeepSpeed's CPU accelerator."""
    from deepspeed.accelerator import get_accelerator

    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            raise RuntimeError(f"DeepSpeed's CPU accelerator has no {name}")
        builder.load(verbose=False)


def build_in_subprocess(timeout_s: float = 1200) -> None:
    """:func:`build` in a fresh process with ``DS_ACCELERATOR=cpu`` (what the jobs' runtime env sets) and this
    Python's bin folder first on PATH, as the jobs have it: torch builds with the first ``ninja`` on PATH, and an
    op built by another ninja version (a system one) is built again by the job."""
    from gold_plugin.testing.ray_head import job_env

    env = {**job_env(), "DS_ACCELERATOR": "cpu"}
    subprocess.run(
        [sys.executable, "-m", "gold_plugin.testing.deepspeed_ops"], env=env, check=True, timeout=timeout_s
    )


if __name__ == "__main__":
    build()
