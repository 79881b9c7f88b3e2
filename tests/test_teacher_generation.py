"""The teacher's generation path (``--gold.off_policy_source teacher``): the hf backend on tiny Llamas with the real
Mistral-v1 (Llama-2 chat template, BOS) and Qwen (ChatML) test tokenizers, against hand-written prompts and a
hand-run argmax loop."""

from __future__ import annotations

import copy

import pytest
import torch

from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.teacher import HFTeacher
from gold_plugin.teacher.generation import GenerationParams, TeacherGeneration, finish
from gold_plugin.testing.tiny_teacher import save_tiny_teacher

QUESTION = "What is two plus two?"
CHAT = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("gen_mistral"), "mistral", seed=5)


@pytest.fixture(scope="module")
def mistral_teacher(mistral_dir) -> HFTeacher:
    return HFTeacher(str(mistral_dir), tokenizer=load_packaged_tokenizer("mistral"), micro_batch_size=4)


@pytest.fixture(scope="module")
def qwen_teacher(tmp_path_factory) -> HFTeacher:
    path = save_tiny_teacher(tmp_path_factory.mktemp("gen_qwen"), "qwen", seed=6)
    return HFTeacher(str(path), tokenizer=load_packaged_tokenizer("qwen"), micro_batch_size=4)


def argmax_loop(model, prompt_ids: list[int], steps: int, stops: set[int]) -> tuple[list[int], bool]:
    """Greedy decoding by hand: one unpadded forward of the whole sequence per new token."""
    ids, new = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in stops:
                return new, True
            new.append(token)
            ids.append(token)
    return new, False


def spy_generate(monkeypatch, teacher: HFTeacher) -> list[list[list[int]]]:
    """Record the (unpadded) prompt ids of every ``model.generate`` call."""
    calls: list[list[list[int]]] = []
    original = teacher.model.generate

    def recording(*, input_ids, attention_mask, **kwargs):
        calls.append([row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)])
        return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(teacher.model, "generate", recording)
    return calls


@pytest.mark.parametrize(
    ("name", "template_text"),
    [
        (
            "mistral",
            f"<s>[INST] {QUESTION} [/INST]",
        ),  # Llama-2 template: its own BOS, no generation prompt text
        ("qwen", f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"),  # ChatML
    ],
)
def test_greedy_chat_generation_equals_a_hand_run_argmax_loop_on_the_templated_ids(
    request, monkeypatch, name, template_text
):
    teacher: HFTeacher = request.getfixturevalue(f"{name}_teacher")
    tok = teacher.tokenizer
    calls = spy_generate(monkeypatch, teacher)
    [generation] = teacher.generate([CHAT], GenerationParams(max_new_tokens=7, temperature=0.0))

    # The model received the teacher's own chat template, rendered as written by hand.
    expected_ids = tok(template_text, add_special_tokens=False)["input_ids"]
    assert calls == [[expected_ids]]
    if name == "mistral":
        assert expected_ids[0] == tok.bos_token_id and expected_ids.count(tok.bos_token_id) == 1
    new, ended = argmax_loop(
        teacher.model, expected_ids, 7, {teacher.encoder.end_of_turn_id, tok.eos_token_id}
    )
    assert not ended and len(new) == 7  # random weights: the end-of-turn token is not the argmax here
    assert generation == TeacherGeneration(
        text=tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False),
        finished=False,
        num_tokens=7,
    )
    assert generation.text  # real text, decoded by the teacher's tokenizer


def test_generation_stops_at_the_end_of_turn_token_which_is_not_part_of_the_text(mistral_dir):
    """The third greedy token made the end-of-turn token: the completion is the first two tokens, finished."""
    tok = load_packaged_tokenizer("mistral")
    plain = HFTeacher(str(mistral_dir), tokenizer=tok)
    prompt_ids = plain.encoder.prompt_ids(CHAT).tolist()
    new, _ = argmax_loop(plain.model, prompt_ids, 3, set())
    assert len(set(new)) == 3
    stopping = HFTeacher(str(mistral_dir), tokenizer=tok, end_of_turn_token=tok.convert_ids_to_tokens(new[2]))
    [generation] = stopping.generate([CHAT], GenerationParams(max_new_tokens=10, temperature=0.0))
    assert generation == TeacherGeneration(
        text=tok.decode(new[:2], skip_special_tokens=True), finished=True, num_tokens=2
    )


def test_batched_prompts_of_different_lengths_equal_one_by_one(mistral_teacher):
    prompts = [
        CHAT,
        "A plain text prompt that is a good deal longer than the others, read verbatim",
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
         {"role": "user", "content": "Another one?"}],
    ]  # fmt: skip
    params = GenerationParams(max_new_tokens=6, temperature=0.0)
    batched = mistral_teacher.generate(prompts, params)
    assert batched == [mistral_teacher.generate([p], params)[0] for p in prompts]
    # A text prompt gets the tokenizer's BOS, as in scoring.
    assert mistral_teacher.encoder.prompt_ids(prompts[1])[0] == mistral_teacher.tokenizer.bos_token_id


def test_sampling_is_seeded_and_leaves_the_global_generator_alone(mistral_teacher):
    prompts = [CHAT, "Once upon a time"] * 3
    state = torch.get_rng_state()
    first = mistral_teacher.generate(prompts, GenerationParams(max_new_tokens=8, temperature=1.0, seed=11))
    assert torch.equal(torch.get_rng_state(), state)
    again = mistral_teacher.generate(prompts, GenerationParams(max_new_tokens=8, temperature=1.0, seed=11))
    other = mistral_teacher.generate(prompts, GenerationParams(max_new_tokens=8, temperature=1.0, seed=12))
    greedy = mistral_teacher.generate(prompts, GenerationParams(max_new_tokens=8, temperature=0.0))
    assert first == again
    assert first != other
    assert len({g.text for g in first[0::2]}) > 1  # the same prompt sampled three times differs
    assert len({g.text for g in greedy[0::2]}) == 1


def test_a_long_prompt_is_cut_from_the_left_keeping_its_bos(mistral_dir, monkeypatch):
    tok = load_packaged_tokenizer("mistral")
    teacher = HFTeacher(str(mistral_dir), tokenizer=tok, max_len=20)
    calls = spy_generate(monkeypatch, teacher)
    text = " ".join(f"w{i}" for i in range(40))
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    assert len(ids) > 20
    [generation] = teacher.generate([text], GenerationParams(max_new_tokens=8, temperature=0.0))
    assert calls == [[[ids[0], *ids[-11:]]]]  # 12 prompt tokens + 8 new = the context of 20
    assert generation.num_tokens == 8


def test_a_prompt_the_teacher_cannot_render_gets_an_error_and_the_batch_goes_on(mistral_dir):
    tok = copy.deepcopy(load_packaged_tokenizer("mistral"))
    tok.chat_template = None
    teacher = HFTeacher(str(mistral_dir), tokenizer=tok)
    bad, good = teacher.generate([CHAT, "Plain text"], GenerationParams(max_new_tokens=3, temperature=0.0))
    assert bad.error is not None and "no chat template" in bad.error and bad.text == ""
    assert good.error is None and good.num_tokens == 3


def test_finish_cuts_at_the_first_stop_or_the_limit_and_drops_a_broken_last_character():
    tok = load_packaged_tokenizer("qwen")
    hello = tok("Hello there", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert finish(tok, [*hello, end, *hello], [end], 10) == TeacherGeneration("Hello there", True, len(hello))
    assert finish(tok, [*hello, *hello], [end], len(hello)) == TeacherGeneration(
        "Hello there", False, len(hello)
    )
    assert finish(tok, [end], [end], 5) == TeacherGeneration("", True, 0)
    fraktur = tok("\U0001d518", add_special_tokens=False)[
        "input_ids"
    ]  # 4 UTF-8 bytes in two byte-level tokens
    assert len(fraktur) == 2
    # Cut inside the character: its first token alone decodes to U+FFFD, which the completion leaves out.
    assert finish(tok, [*hello, fraktur[0]], [end], len(hello) + 1) == TeacherGeneration(
        "Hello there", False, len(hello) + 1
    )
    assert finish(tok, [*hello, *fraktur], [end], 9).text == "Hello there\U0001d518"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": 4, "temperature": -1.0}, "temperature must be >= 0"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p must be in"),
    ],
)
def test_bad_generation_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationParams(**kwargs)
