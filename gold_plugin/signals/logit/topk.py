"""The teacher's top-k of one sample, checked against its alignment (both losses' input builders read it so)."""

from __future__ import annotations

import numpy as np
import torch

from gold_plugin.alignment.result import Alignment


def checked_topk(
    b: int, alignment: Alignment, top_ids: np.ndarray | torch.Tensor, top_lp: np.ndarray | torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``b``'s teacher top-k as ``(int64, float32)`` arrays ``[n_teacher_tokens, k]``; ``ValueError`` naming
    the sample if the shapes do not fit its alignment."""
    top_ids = np.asarray(top_ids, dtype=np.int64)
    top_lp = np.asarray(top_lp, dtype=np.float32)
    if top_ids.ndim != 2 or top_ids.shape != top_lp.shape or top_ids.shape[0] != len(alignment.teacher_group):
        raise ValueError(
            f"Sample {b}: teacher top-k of shape {top_ids.shape} / {top_lp.shape} for "
            f"{len(alignment.teacher_group)} teacher tokens; expected [n_teacher_tokens, k]."
        )
    return top_ids, top_lp
