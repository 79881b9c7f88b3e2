"""Where the definitions coincide, the aligned logit loss equals TRL 1.16's hybrid ULD loss (and original ULD).

TRL compares full teacher distributions pairwise by position (``use_extended_uld=False``) with a vocabulary map by
equal token strings. With a top-k covering the whole teacher vocabulary, the same string-equality map, the same
weights, ``matched_normalization="none"`` and per-sample mean-then-batch-mean reduction, both compute the same number.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.signals import LogitLossOptions, aligned_logit_loss
from gold_plugin.testing.trl_reference import trl_uld_config


def _import_trl_gold_trainer():
    """TRL decides at import time whether vLLM is installed. The OpenRLHF tests put import-only vLLM stand-ins
    (tests/stubs) on ``sys.path``; hide them while TRL is imported, or TRL would try to import real vLLM
    internals from them. trl is a test requirement: a failing import fails this module instead of skipping."""
    stubs = str(Path(__file__).parent / "stubs")
    stub_modules = {
        name: module
        for name, module in sys.modules.items()
        if (name == "vllm" or name.startswith("vllm.")) and stubs in (getattr(module, "__file__", None) or "")
    }
    saved_path = list(sys.path)
    for name in stub_modules:
        del sys.modules[name]
    sys.path[:] = [entry for entry in sys.path if entry != stubs]
    try:
        return importlib.import_module("trl.experimental.gold.gold_trainer")
    finally:
        sys.path[:] = saved_path
        sys.modules.update(stub_modules)


gold_trainer = _import_trl_gold_trainer()


def _trl_loss_fn(student_tok, teacher_tok, **config):
    return gold_trainer.ULDLoss(trl_uld_config(**config), student_tok, teacher_tok)


def _string_equality_map(student_tok, teacher_tok, teacher_vocab: int) -> torch.Tensor:
    """TRL's rule, written independently: teacher id -> student id with the identical token string."""
    student_vocab = student_tok.get_vocab()
    mapping = torch.full((teacher_vocab,), -1, dtype=torch.int64)
    for token, teacher_id in teacher_tok.get_vocab().items():
        if token in student_vocab:
            mapping[teacher_id] = student_vocab[token]
    return mapping


@pytest.fixture(scope="module")
def tokenizers():
    return load_packaged_tokenizer("gpt2"), load_packaged_tokenizer("mistral")


CASES = [
    dict(beta=0.5),
    dict(beta=0.0, uld_hybrid_matched_weight=0.7, uld_hybrid_unmatched_weight=0.4),
    dict(beta=1.0),
    dict(beta=0.3, uld_student_temperature=1.5, uld_teacher_temperature=0.8),
    dict(uld_use_hybrid_loss=False, uld_student_temperature=0.9),
]


@pytest.mark.parametrize(
    ("case", "dtype"),
    [(case, torch.float64) for case in CASES] + [(CASES[0], torch.float32), (CASES[-1], torch.float32)],
)
def test_equals_trl_hybrid_uld(tokenizers, case: dict, dtype: torch.dtype) -> None:
    student_tok, teacher_tok = tokenizers
    batch, time = 2, 3
    student_vocab, teacher_vocab = len(student_tok.get_vocab()), len(teacher_tok.get_vocab())
    gen = torch.Generator().manual_seed(0)
    student_logits = torch.randn(batch, time, student_vocab, generator=gen, dtype=torch.float64).to(dtype)
    teacher_logits = torch.randn(batch, time, teacher_vocab, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.zeros(batch, time, dtype=torch.long)  # every position is an answer position

    trl_fn = _trl_loss_fn(student_tok, teacher_tok, **case)
    s_trl = student_logits.clone().requires_grad_()
    trl_loss = trl_fn(s_trl, teacher_logits, labels, labels, labels, labels)
    (trl_grad,) = torch.autograd.grad(trl_loss, s_trl)

    hybrid = case.get("uld_use_hybrid_loss", True)
    teacher_lp = torch.log_softmax(teacher_logits / case.get("uld_teacher_temperature", 1.0), dim=-1)
    if case.get("uld_teacher_temperature", 1.0) != 1.0:
        # Ours applies the teacher temperature itself (exact when the top-k covers the vocabulary).
        teacher_lp = torch.log_softmax(teacher_logits, dim=-1)
    values, ids = teacher_lp.reshape(batch * time, -1).topk(teacher_vocab, dim=-1)
    s_ours = student_logits.clone().requires_grad_()
    ours = aligned_logit_loss(
        s_ours,
        ids,
        values,
        _string_equality_map(student_tok, teacher_tok, teacher_vocab) if hybrid else None,
        positions=torch.cartesian_prod(torch.arange(batch), torch.arange(time)),  # row-major, as ids
        options=LogitLossOptions(
            beta=case.get("beta", 0.5),
            matched_weight=case.get("uld_hybrid_matched_weight"),
            unmatched_weight=case.get("uld_hybrid_unmatched_weight"),
            student_temperature=case.get("uld_student_temperature", 1.0),
            teacher_temperature=case.get("uld_teacher_temperature", 1.0),
            alignment="spans" if hybrid else "positional",
            matched_normalization="none",
            chunk_size=4,
        ),
    )
    our_loss = ours.loss.reshape(batch, time).mean(dim=1).mean()
    (our_grad,) = torch.autograd.grad(our_loss, s_ours)
    assert our_loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    # fp32: near-ties in the sorted vectors may flip an L1 sign on a single entry (|grad| ~ 1e-6).
    atol = 1e-7 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(our_grad.double(), trl_grad.double(), atol=atol, rtol=1e-4)
