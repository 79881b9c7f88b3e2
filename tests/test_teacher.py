"""Teacher scoring contract and the hf backend, on a tiny Llama with real test tokenizers (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gold_plugin.alignment import encode_continuation, ids_to_bytes
from gold_plugin.config import GoldConfig, GoldConfigError, TeacherConfig
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.teacher import HFTeacher, TeacherRequest, TeacherResult, TeacherScorer, build_teacher
from gold_plugin.teacher.prepare import PreparedSequence, RequestEncoder, fit_to_context
from gold_plugin.testing.tiny_teacher import save_tiny_teacher

TOPK = 8
CHAT = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory):
    """Tiny Llama teachers with the mistral (SentencePiece) and gpt2/qwen (byte-level) vocabularies."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = save_tiny_teacher(tmp_path_factory.mktemp(f"teacher_{name}"), name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def mistral_teacher(teacher_dirs) -> HFTeacher:
    path = teacher_dirs("mistral")
    return HFTeacher(str(path), topk=TOPK, micro_batch_size=3, tokenizer=load_packaged_tokenizer("mistral"))


@pytest.fixture(scope="session")
def gpt2_teacher(teacher_dirs) -> HFTeacher:
    path = teacher_dirs("gpt2")
    return HFTeacher(str(path), topk=TOPK, micro_batch_size=4, tokenizer=load_packaged_tokenizer("gpt2"))


def direct_scores(model, prompt_ids, response_ids, topk: int = TOPK):
    """Reference: one unpadded forward pass of the whole sequence, float32 log-softmax."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    start = len(prompt_ids) - 1
    rows = logprobs[start : start + len(response_ids)]
    token_lp = rows.gather(-1, torch.tensor(list(response_ids))[:, None]).squeeze(-1)
    values, indices = rows.topk(topk, dim=-1)
    return token_lp.numpy(), indices.numpy(), values.numpy()


def chat_prompt_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_is_a_teacher_scorer(mistral_teacher):
    assert isinstance(mistral_teacher, TeacherScorer)
    assert mistral_teacher.max_len == 256  # from max_position_embeddings
    assert mistral_teacher.device.type == "cpu" and mistral_teacher.model.dtype == torch.float32


def test_chat_prompt_logprobs_equal_direct_forward(mistral_teacher):
    tok = mistral_teacher.tokenizer
    response = "Two plus two is four, obviously."
    [result] = mistral_teacher.score([TeacherRequest(CHAT, response)])
    assert result.error is None
    # The teacher's own template rendered the prompt; the response is tokenised on its own.
    prompt_ids = chat_prompt_ids(tok, CHAT)
    assert prompt_ids[0] == tok.bos_token_id  # the Llama-2 template's own BOS, not a second one
    np.testing.assert_array_equal(mistral_teacher.encoder.prompt_ids(CHAT), prompt_ids)
    expected_ids = encode_continuation(tok, response)
    np.testing.assert_array_equal(result.token_ids, expected_ids)
    lp, top_ids, top_lp = direct_scores(mistral_teacher.model, prompt_ids, expected_ids)
    np.testing.assert_allclose(result.logprobs, lp, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(result.topk_ids, top_ids)
    np.testing.assert_allclose(result.topk_logprobs, top_lp, atol=1e-5, rtol=0)
    assert result.logprobs.dtype == np.float32 and result.token_ids.dtype == np.int64
    assert result.topk_ids.shape == (len(expected_ids), TOPK) and result.topk_ids.dtype == np.int64
    # top-k is sorted best first and the token's own log-prob never beats the best one
    assert np.all(np.diff(result.topk_logprobs, axis=1) <= 0)
    assert np.all(result.logprobs <= result.topk_logprobs[:, 0] + 1e-6)
    assert result.num_masked == 0 and result.num_prompt_truncated == 0 and result.scored.all()


def test_text_prompt_gets_the_tokenizers_bos_once(mistral_teacher):
    tok = mistral_teacher.tokenizer
    encoder = mistral_teacher.encoder
    plain = encoder.prompt_ids("[INST] hi [/INST]")
    np.testing.assert_array_equal(plain, tok("[INST] hi [/INST]").input_ids)  # as the tokenizer does it
    assert plain[0] == tok.bos_token_id and (plain == tok.bos_token_id).sum() == 1
    with_bos = encoder.prompt_ids("<s>[INST] hi [/INST]")  # e.g. a prompt rendered by a student template
    assert with_bos[0] == tok.bos_token_id and (with_bos == tok.bos_token_id).sum() == 1


def test_batched_equals_one_by_one(gpt2_teacher):
    requests = [
        TeacherRequest(CHAT, " Four."),
        TeacherRequest(
            "Tell me a story about a dragon.", " Once upon a time a small dragon lived by the sea."
        ),
        TeacherRequest([{"role": "user", "content": "Name three colours."}], "Red, green and blue.", True),
        TeacherRequest("A", "b"),
        TeacherRequest("Long prompt " * 20, " and a response of medium size here.", True),
    ]
    batched = gpt2_teacher.score(requests)  # micro-batches of 4 with right padding, sorted by length
    single = [gpt2_teacher.score([r])[0] for r in requests]
    assert len({len(r.token_ids) for r in batched}) > 2  # lengths differ, so padding was exercised
    for got, ref in zip(batched, single):
        np.testing.assert_array_equal(got.token_ids, ref.token_ids)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got.topk_ids, ref.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "qwen", "mistral"])
def test_response_bytes_are_exactly_the_response_text(name):
    tok = load_packaged_tokenizer(name)
    encoder = RequestEncoder(tok, max_context=512)
    texts = [
        "Hello world",  # SentencePiece would add a dummy-prefix space here
        " leading space",
        "  two spaces",
        "\nstarts with a newline",
        "ünïcödé and emoji 😀 and CJK 漢字",
        "special-token strings as text: <s> </s> <|im_end|> <|endoftext|>",
        "trailing spaces   ",
        "x",
    ]
    for text in texts:
        ids = encoder.response_ids(text)
        assert ids_to_bytes(tok, ids) == text.encode("utf-8"), (name, text, tok.convert_ids_to_tokens(ids))
    if name == "mistral":
        first = tok.convert_ids_to_tokens(encoder.response_ids("Hello world").tolist())[0]
        assert first == "Hello"  # not "▁Hello": no dummy-prefix space


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
    | st.text(alphabet=" \n\tab<>|/sé😀漢_", max_size=16)
)
@example(text="x ▁▁y")  # SentencePiece reads a literal U+2581 as a space (found by Hypothesis)
def test_any_text_round_trips_through_every_test_tokenizer(text):
    for name in ("gpt2", "qwen", "mistral"):
        encoder = _encoder(name)
        ids = encoder.response_ids(text)  # raises RequestRejected if no tokenisation reproduces the bytes
        assert ids_to_bytes(encoder.tokenizer, ids) == text.encode("utf-8")


def test_a_character_the_tokenizer_reads_as_another_is_spelled_in_byte_pieces():
    """SentencePiece reads a literal ``▁`` (U+2581) as a space, so no usual encoding reproduces it: it is spelled by
    the byte-fallback pieces of its UTF-8 bytes (E2 96 81), the text around it encoded as usual."""
    encoder = _encoder("mistral")
    tok = encoder.tokenizer
    ids = encoder.response_ids("a▁b").tolist()
    assert tok.convert_ids_to_tokens(ids) == ["a", "<0xE2>", "<0x96>", "<0x81>", "b"]
    assert ids_to_bytes(tok, ids) == "a▁b".encode()


_ENCODERS: dict[str, RequestEncoder] = {}


def _encoder(name: str) -> RequestEncoder:
    if name not in _ENCODERS:
        _ENCODERS[name] = RequestEncoder(load_packaged_tokenizer(name), max_context=512)
    return _ENCODERS[name]


def test_output_layer_sees_only_response_positions_in_chunks(teacher_dirs):
    tok = load_packaged_tokenizer("gpt2")
    teacher = HFTeacher(str(teacher_dirs("gpt2")), topk=2, logit_chunk_size=5, tokenizer=tok)
    seen: list[tuple[int, ...]] = []
    hook = teacher._lm_head.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape)))
    try:
        results = teacher.score(
            [TeacherRequest("Long prompt " * 30, " short reply"), TeacherRequest(CHAT, " Four.")]
        )
    finally:
        hook.remove()
    scored = sum(int(r.scored.sum()) for r in results)
    assert all(len(shape) == 2 and shape[0] <= 5 for shape in seen)  # [positions, hidden], chunked
    assert sum(shape[0] for shape in seen) == scored  # no prompt position reaches the vocabulary


def test_long_responses_scored_in_chunks_equal_one_chunk(teacher_dirs):
    """--gold.teacher.logprob_chunk_size: the output layer and log-softmax see a few positions at a time, far fewer
    than one response holds, and the log-probs and top-k equal those of one chunk holding every position."""
    tok = load_packaged_tokenizer("gpt2")
    config = TeacherConfig(model_name_or_path=str(teacher_dirs("gpt2")), topk=TOPK, logprob_chunk_size=7)
    chunked = build_teacher(config, tokenizer=tok)
    assert isinstance(chunked, HFTeacher) and chunked.logit_chunk_size == 7
    whole = HFTeacher(str(teacher_dirs("gpt2")), topk=TOPK, logit_chunk_size=1 << 20, tokenizer=tok)
    requests = [
        TeacherRequest(CHAT, "A long answer, with many tokens: " + "two plus two is four, " * 12, True),
        TeacherRequest("Prompt:", " another long continuation " * 9),
        TeacherRequest(CHAT, " Four."),
    ]
    seen: list[int] = []
    hook = chunked._lm_head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    try:
        results = chunked.score(requests)
    finally:
        hook.remove()
    references = whole.score(requests)
    assert max(seen) == 7 and min(r.num_tokens for r in results[:2]) > 5 * 7  # each long response: > 5 chunks
    assert sum(seen) == sum(int(r.scored.sum()) for r in results)
    for got, ref in zip(results, references):
        assert got.error is None and got.scored.all()
        np.testing.assert_array_equal(got.token_ids, ref.token_ids)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-6, atol=1e-6)  # float rounding
        np.testing.assert_array_equal(got.topk_ids, ref.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, rtol=1e-6, atol=1e-6)
    with pytest.raises(GoldConfigError, match="--gold.teacher.logprob_chunk_size must be >= 1"):
        GoldConfig(teacher=TeacherConfig(logprob_chunk_size=0))


@pytest.mark.parametrize(
    ("name", "end_of_turn"), [("qwen", "<|im_end|>"), ("mistral", "</s>"), ("gpt2", "<|endoftext|>")]
)
def test_end_of_turn_token_comes_from_the_template(name, end_of_turn):
    encoder = RequestEncoder(load_packaged_tokenizer(name), max_context=64)
    assert encoder.tokenizer.convert_ids_to_tokens(encoder.end_of_turn_id) == end_of_turn


def test_eos_scores_the_teachers_end_of_turn_as_zero_width(mistral_teacher):
    tok = mistral_teacher.tokenizer
    response = "Four."
    with_eos, without = mistral_teacher.score(
        [TeacherRequest(CHAT, response, True), TeacherRequest(CHAT, response)]
    )
    assert len(with_eos.token_ids) == len(without.token_ids) + 1
    assert with_eos.token_ids[-1] == tok.eos_token_id and with_eos.token_bytes[-1] == 0
    np.testing.assert_array_equal(
        with_eos.token_bytes[:-1], [len(b) for b in (ids_to_bytes(tok, [i]) for i in without.token_ids)]
    )
    assert with_eos.token_bytes.sum() == len(response.encode())
    ids = [*encode_continuation(tok, response), tok.eos_token_id]
    lp, _, _ = direct_scores(mistral_teacher.model, chat_prompt_ids(tok, CHAT), ids)
    np.testing.assert_allclose(with_eos.logprobs, lp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(with_eos.logprobs[:-1], without.logprobs, atol=1e-5, rtol=0)


def test_fit_to_context_truncates_prompt_from_the_left_then_masks():
    prompt = np.arange(100, 110)  # 10 tokens, the first is "BOS"
    kept, fed, dropped = fit_to_context(prompt, 4, max_context=20, num_protected=1)
    assert fed == 4 and dropped == 0 and np.array_equal(kept, prompt)
    kept, fed, dropped = fit_to_context(prompt, 14, max_context=20, num_protected=1)
    assert np.array_equal(kept, [100, 105, 106, 107, 108, 109]) and fed == 14 and dropped == 4
    kept, fed, dropped = fit_to_context(prompt, 30, max_context=20, num_protected=1)
    assert np.array_equal(kept, [100]) and fed == 19 and dropped == 9  # the BOS stays, 11 tokens masked
    kept, fed, dropped = fit_to_context(prompt, 30, max_context=20, num_protected=0)
    assert np.array_equal(kept, [109]) and fed == 19 and dropped == 9
    kept, fed, dropped = fit_to_context(np.zeros(0, dtype=np.int64), 30, max_context=20, num_protected=0)
    assert kept.size == 0 and fed == 20 and dropped == 0


def test_response_longer_than_the_context_is_masked_and_counted(teacher_dirs):
    tok = load_packaged_tokenizer("mistral")
    teacher = HFTeacher(str(teacher_dirs("mistral")), topk=TOPK, max_len=24, tokenizer=tok)
    prompt = "Some long context. " * 6
    response = "one two three four five six seven eight nine ten " * 3
    [result] = teacher.score([TeacherRequest(prompt, response, ends_with_eos=True)])
    assert result.error is None
    full_prompt = teacher.encoder.prompt_ids(prompt)
    response_ids = [*encode_continuation(tok, response), tok.eos_token_id]
    assert len(result.token_ids) == len(response_ids)  # every token reported, bytes intact
    assert ids_to_bytes(tok, result.token_ids) == response.encode()
    # Only the BOS is left of the prompt; 23 response tokens fit, the rest (and the EOS) are masked.
    assert result.num_prompt_truncated == len(full_prompt) - 1
    assert result.num_masked == len(response_ids) - 23
    assert np.isnan(result.logprobs[23:]).all() and not np.isnan(result.logprobs[:23]).any()
    assert (result.topk_ids[23:] == -1).all() and np.isneginf(result.topk_logprobs[23:]).all()
    lp, _, _ = direct_scores(teacher.model, [tok.bos_token_id], response_ids[:23])
    np.testing.assert_allclose(result.logprobs[:23], lp, atol=1e-5, rtol=0)


def test_prompt_is_cut_from_the_left_when_only_the_prompt_is_too_long(teacher_dirs):
    tok = load_packaged_tokenizer("gpt2")
    teacher = HFTeacher(str(teacher_dirs("gpt2")), max_len=32, tokenizer=tok)
    prompt = " ".join(f"w{i}" for i in range(40))
    [result] = teacher.score([TeacherRequest(prompt, " the end")])
    full_prompt = teacher.encoder.prompt_ids(prompt)
    response_ids = encode_continuation(tok, " the end")
    kept = full_prompt[len(full_prompt) - (32 - len(response_ids)) :]  # gpt2 has no BOS to protect
    assert result.num_prompt_truncated == len(full_prompt) - len(kept) and result.num_masked == 0
    assert result.topk_ids is None and result.topk_logprobs is None
    lp, _, _ = direct_scores(teacher.model, kept, response_ids)
    np.testing.assert_allclose(result.logprobs, lp, atol=1e-5, rtol=0)


def test_bad_requests_get_documented_results_and_do_not_break_the_batch(gpt2_teacher):
    good = TeacherRequest(CHAT, " Four.")
    requests = [
        TeacherRequest(CHAT, ""),  # empty response: zero tokens, no error
        TeacherRequest(CHAT, "bad \ud800 surrogate"),  # not encodable as UTF-8
        TeacherRequest(12345, "x"),  # type: ignore[arg-type]
        good,
        TeacherRequest("", "no prompt at all"),  # nothing to condition the first token on
    ]
    empty, surrogate, bad_prompt, scored, no_prompt = gpt2_teacher.score(requests)
    assert empty.error is None and empty.num_tokens == 0 and empty.topk_ids.shape == (0, TOPK)
    assert surrogate.error and "Unicode" in surrogate.error and surrogate.num_tokens == 0
    assert bad_prompt.error and "prompt must be text" in bad_prompt.error
    [alone] = gpt2_teacher.score([good])
    np.testing.assert_allclose(scored.logprobs, alone.logprobs, atol=1e-5, rtol=0)
    assert no_prompt.error is None and no_prompt.num_masked == 1
    assert np.isnan(no_prompt.logprobs[0]) and not np.isnan(no_prompt.logprobs[1:]).any()
    lp, _, _ = direct_scores(gpt2_teacher.model, no_prompt.token_ids[:1], no_prompt.token_ids[1:])
    np.testing.assert_allclose(no_prompt.logprobs[1:], lp, atol=1e-5, rtol=0)


def test_chat_prompt_without_template_is_an_error_result(teacher_dirs):
    tok = load_packaged_tokenizer("gpt2")
    bare = type(tok).from_pretrained(str(teacher_dirs("gpt2")))
    bare.chat_template = None
    teacher = HFTeacher(str(teacher_dirs("gpt2")), tokenizer=bare)
    chat, text = teacher.score([TeacherRequest(CHAT, " hi"), TeacherRequest("plain", " hi")])
    assert chat.error and "chat template" in chat.error and text.error is None


def test_failed_result_shape():
    result = TeacherResult.failed("why", topk=4)
    assert result.num_tokens == 0 and result.topk_ids.shape == (0, 4) and result.error == "why"


def test_build_teacher_from_config(teacher_dirs):
    config = TeacherConfig(
        model_name_or_path=str(teacher_dirs("gpt2")), topk=3, max_len=40, micro_batch_size=2
    )
    teacher = build_teacher(config)
    assert isinstance(teacher, HFTeacher)
    assert (teacher.topk, teacher.max_len, teacher.micro_batch_size) == (3, 40, 2)
    [result] = teacher.score([TeacherRequest(CHAT, " Four.")])
    assert result.topk_ids.shape == (len(result.token_ids), 3)
    with pytest.raises(GoldConfigError, match="model_name_or_path"):
        build_teacher(TeacherConfig())


def test_a_batch_renders_each_distinct_prompt_once(monkeypatch):
    """A prompt's samples share its rendering: the teacher's template and tokenizer run once per distinct prompt in a
    batch, and every request gets what preparing it alone gives."""
    encoder = RequestEncoder(load_packaged_tokenizer("qwen"), max_context=512)
    chats = [[{"role": "user", "content": "Add 2 and 3."}], [{"role": "user", "content": "Spell cat."}]]
    requests = [
        TeacherRequest(prompt=prompt, response=response, ends_with_eos=True)
        for prompt in (chats[0], chats[1], "plain text prompt")
        for response in ("5", "It is 5.", "c-a-t")
    ]
    rendered: list[object] = []
    original = encoder.prompt_ids
    monkeypatch.setattr(encoder, "prompt_ids", lambda prompt: rendered.append(prompt) or original(prompt))
    batched = encoder.prepare_all(requests)
    assert rendered == [chats[0], chats[1], "plain text prompt"]
    for got, request in zip(batched, requests):
        alone = encoder.prepare(request)
        assert isinstance(got, PreparedSequence) and np.array_equal(got.input_ids, alone.input_ids)
        assert got.prompt_len == alone.prompt_len
