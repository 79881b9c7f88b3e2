"""Gemma-3-270M (262,144 ids, sliding-window attention, tied embeddings) on a real vLLM (the CPU build): the vllm
teacher's log-probs and top-64 equal the hf teacher's on the same requests."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer
from vllm_helpers import require_vllm

require_vllm()

from gold_plugin.teacher import HFTeacher, TeacherRequest, VLLMTeacher  # noqa: E402
from gold_plugin.testing.tiny_teacher import vllm_cpu_engine_kwargs  # noqa: E402

pytestmark = pytest.mark.slow

REQUESTS = [
    TeacherRequest(
        [{"role": "user", "content": "Translate into German: the house"}], "Das Haus", ends_with_eos=True
    ),
    TeacherRequest("The capital of France is", " Paris, and 東京 is in Japan – 1234 Häuser!"),
    TeacherRequest("Lone surrogate:", "bad \ud800 text"),  # rejected by both, the batch goes on
]


def test_vllm_and_hf_teachers_agree_on_gemma(pretrained_pair):
    chat = AutoTokenizer.from_pretrained(pretrained_pair.teacher_chat_tokenizer)
    engine = VLLMTeacher(
        str(pretrained_pair.teacher), topk=64, max_len=256, tokenizer=chat, **vllm_cpu_engine_kwargs()
    )
    try:
        from_vllm = engine.score(REQUESTS)
    finally:
        engine.close()
    from_hf = HFTeacher(str(pretrained_pair.teacher), topk=64, max_len=255, tokenizer=chat).score(REQUESTS)
    for got, ref in zip(from_vllm[:2], from_hf[:2]):
        assert got.error is None and ref.error is None
        np.testing.assert_array_equal(got.token_ids, ref.token_ids)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=2e-4, rtol=0)
        assert (got.topk_ids == ref.topk_ids).mean() > 0.99  # near-ties may swap places
        np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=2e-4, rtol=0)
    assert from_vllm[2].error and from_vllm[2].error == from_hf[2].error
