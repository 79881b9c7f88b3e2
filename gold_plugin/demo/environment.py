"""What the demo's run changes in this process, and restores when it ends: its output silenced (:func:`quiet`)
and what makes its figures move pinned (:func:`pinned`)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import warnings
from collections.abc import Iterator

import numpy as np
import torch

QUIET_ENVIRONMENT = {"TOKENIZERS_PARALLELISM": "false"}
"""Set by :func:`quiet` where unset: no warning from the tokenizers library when Ray forks after a tokenizer ran
in parallel (it writes to the terminal itself, past Python's logging)."""


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` added where unset, restored on exit."""
    added = {name: value for name, value in values.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The demo's output is its table, its plot's path and one progress bar: inside this block no log record
    below ERROR is emitted (Ray, DeepSpeed, transformers), no ``warnings`` are shown, transformers' and the hub's
    progress bars ("Loading weights", "Writing model shards") are off, and :data:`QUIET_ENVIRONMENT` is set.
    Everything is restored on exit, so other runs and the tests in the same process keep their settings. (The
    Ray teacher's own output is kept out by ``train(..., quiet=True)``, :class:`~gold_plugin.local.launch.RayTeacher`.)
    """
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    disabled_below = logging.root.manager.disable
    verbosity = hf_logging.get_verbosity()
    bars_on, hub_bars_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    with _environment(QUIET_ENVIRONMENT), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            logging.disable(disabled_below)
            hf_logging.set_verbosity(verbosity)
            if bars_on:
                hf_logging.enable_progress_bar()
            if hub_bars_off:
                hub_utils.disable_progress_bars()
            else:
                hub_utils.enable_progress_bars()


@contextlib.contextmanager
def pinned(seed: int, num_threads: int = 1) -> Iterator[None]:
    """What makes the demo's figures move between runs on machines of one kind, fixed while the block runs:
    ``num_threads`` torch threads here and ``OMP_NUM_THREADS`` for the Ray teacher (a float sum's order follows
    the thread count), Python's, NumPy's and torch's RNGs seeded with ``seed``, and torch's deterministic
    algorithms (``warn_only``: an op without one still runs; ``CUBLAS_WORKSPACE_CONFIG`` for cuBLAS on a GPU).
    The thread count and the deterministic switch are restored on exit (the RNGs are left seeded).
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    environment = {"OMP_NUM_THREADS": str(num_threads), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    with _environment(environment):
        torch.set_num_threads(num_threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
