"""Where the off-policy completions of ``--gold.lmbda < 1`` come from (``--gold.off_policy_source``): the draw and
the one path that turns references and teacher-written texts into student response ids (``gold_plugin.step``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gold_plugin.alignment import encode_continuation
from gold_plugin.config import GoldConfig, GoldConfigError, TeacherConfig
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.step import (
    OffPolicyDraw,
    OffPolicyResponses,
    choose_off_policy,
    draw_off_policy,
    off_policy_responses,
    teacher_completion_call,
)
from gold_plugin.teacher.generation import GenerationParams, TeacherGeneration, generate_counting_retries

REFERENCES = ["a", None, "c", "d", "e", None]
# choose_off_policy(REFERENCES, 0.5, seed=7, step=4) draws prompts 1, 2 and 4; prompt 1 has no reference.
SEED, STEP = 7, 4


def gold(source: str, lmbda: float = 0.5) -> GoldConfig:
    return GoldConfig(lmbda=lmbda, off_policy_source=source, teacher=TeacherConfig(topk=4))


class RecordingTeacher:
    """An in-process teacher that writes known texts and records what it was asked."""

    def __init__(self, outputs: dict[str, TeacherGeneration]):
        self.outputs = outputs
        self.calls: list[tuple[list, GenerationParams]] = []

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        return [self.outputs[p if isinstance(p, str) else p[-1]["content"]] for p in prompts]


def complete(
    tok, draw, references, teacher_prompts, teacher, *, max_new_tokens, **call
) -> OffPolicyResponses:
    """What a backend does: ask the teacher what the step's call says, then hand the answers back to the step."""
    asked = teacher_completion_call(draw, teacher_prompts, max_new_tokens=max_new_tokens, **call)
    generations, _ = (
        generate_counting_retries(teacher, asked.prompts, asked.params) if asked.params else ([], 0)
    )
    return off_policy_responses(tok, draw, references, asked, generations, max_new_tokens=max_new_tokens)


def as_set(mask: np.ndarray) -> set[int]:
    return set(np.flatnonzero(mask).tolist())


def test_the_draw_is_the_same_prompts_for_every_source():
    with_reference, without = choose_off_policy(REFERENCES, 0.5, SEED, STEP)
    assert (as_set(with_reference), as_set(without)) == ({2, 4}, {1})
    reference = draw_off_policy(REFERENCES, gold("reference"), SEED, STEP)
    teacher = draw_off_policy(REFERENCES, gold("teacher"), SEED, STEP)
    mixed = draw_off_policy(REFERENCES, gold("reference_or_teacher"), SEED, STEP)
    # reference: the dataset's where the row has one; the drawn prompt 1 has none (trained on-policy, counted)
    assert (as_set(reference.off_policy), as_set(reference.teacher), as_set(reference.missing_reference)) == (
        {2, 4},
        set(),
        {1},
    )
    # teacher: every drawn prompt gets the teacher's completion, references or not
    assert (as_set(teacher.off_policy), as_set(teacher.teacher), as_set(teacher.missing_reference)) == (
        {1, 2, 4},
        {1, 2, 4},
        set(),
    )
    # reference_or_teacher: rows with a reference use it, prompt 1 gets the teacher's
    assert (as_set(mixed.off_policy), as_set(mixed.teacher), as_set(mixed.missing_reference)) == (
        {1, 2, 4},
        {1},
        set(),
    )
    assert as_set(mixed.reference) == {2, 4} and as_set(teacher.reference) == set()
    on_policy = draw_off_policy(REFERENCES, GoldConfig(teacher=TeacherConfig(topk=4)), SEED, STEP)
    assert not on_policy.off_policy.any() and not on_policy.teacher.any()


def test_teacher_and_reference_completions_become_student_ids_the_same_way():
    tok = load_packaged_tokenizer("qwen")
    eos = tok.eos_token_id
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(len(REFERENCES))]
    teacher = RecordingTeacher(
        {
            "q1": TeacherGeneration("The teacher's answer: 4.", finished=True, num_tokens=7),
            "q2": TeacherGeneration(
                " cut off mid-sentence by the length limit", finished=False, num_tokens=8
            ),
            "q4": TeacherGeneration("Ünïcode ☃ answer", finished=True, num_tokens=6),
        }
    )
    draw = draw_off_policy(REFERENCES, gold("teacher"), SEED, STEP)
    out = complete(
        tok,
        draw,
        REFERENCES,
        prompts,
        teacher,
        max_new_tokens=12,
        temperature=0.7,
        top_p=0.9,
        seed=SEED,
        step=STEP,
    )
    [(asked, params)] = teacher.calls
    assert asked == [
        prompts[1],
        prompts[2],
        prompts[4],
    ]  # the drawn prompts only, as the teacher prompts given
    expected_seed = int(np.random.SeedSequence([SEED, STEP, 1]).generate_state(1)[0])
    assert params == GenerationParams(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=expected_seed)
    assert out.response_ids[0] is None and out.response_ids[3] is None  # on-policy prompts
    # A finished text ends with the student's EOS, as a reference does; a text cut at its limit does not.
    assert out.response_ids[1] == encode_continuation(tok, "The teacher's answer: 4.") + [eos]
    assert out.response_ids[2] == encode_continuation(tok, " cut off mid-sentence by the length limit")
    assert out.response_ids[4] == encode_continuation(tok, "Ünïcode ☃ answer") + [eos]
    assert as_set(out.draw.off_policy) == as_set(out.draw.teacher) == {1, 2, 4}

    # The student's length limit cuts a long text (then no EOS), whichever the source.
    long = complete(
        tok,
        draw,
        REFERENCES,
        prompts,
        teacher,
        max_new_tokens=3,
        temperature=0.7,
        top_p=0.9,
        seed=SEED,
        step=STEP,
    )
    assert long.response_ids[1] == encode_continuation(tok, "The teacher's answer: 4.")[:3]

    # The same run and step ask for the same seed; the next step for another.
    complete(tok, draw, REFERENCES, prompts, teacher, max_new_tokens=12, temperature=0.7, top_p=0.9,
                         seed=SEED, step=STEP + 1)  # fmt: skip
    assert teacher.calls[1][1].seed == expected_seed and teacher.calls[2][1].seed != expected_seed


def test_the_teacher_gets_the_drawn_prompts_in_text_order_whatever_the_row_order():
    """A sampled batch depends on its order; OpenRLHF lists a batch's prompts in vLLM's completion order, the local
    backend in the data's, so the teacher is asked in the texts' order and each completion lands on its own row."""
    tok = load_packaged_tokenizer("qwen")
    texts = {"q1": "one", "q2": "two", "q4": "four"}
    teacher = RecordingTeacher(
        {q: TeacherGeneration(t, finished=True, num_tokens=1) for q, t in texts.items()}
    )
    draw = draw_off_policy(REFERENCES, gold("teacher"), SEED, STEP)
    options = dict(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=SEED, step=STEP)
    # The rows of the test above (drawn: 1, 2, 4), with texts whose order is not the rows': q4 < q1 < q2.
    prompts = ["q3", "zz q1", "zz q2", "q0", "a q4", "q5"]
    teacher.outputs = {p: teacher.outputs[p.split()[-1]] for p in ("zz q1", "zz q2", "a q4")}
    out = complete(tok, draw, REFERENCES, prompts, teacher, **options)
    assert teacher.calls[-1][0] == ["a q4", "zz q1", "zz q2"]
    for row, text in ((1, "one"), (2, "two"), (4, "four")):
        assert out.response_ids[row] == encode_continuation(tok, text) + [tok.eos_token_id]
    # The same batch in another row order asks the same call; chat messages are ordered by their content too.
    permutation = [4, 0, 2, 5, 1, 3]
    draw_permuted = OffPolicyDraw(*(mask[permutation] for mask in (draw.off_policy, draw.teacher,
                                                                   draw.missing_reference)))  # fmt: skip
    complete(tok, draw_permuted, [REFERENCES[i] for i in permutation],
                         [prompts[i] for i in permutation], teacher, **options)  # fmt: skip
    assert teacher.calls[-1][0] == teacher.calls[-2][0]
    teacher.outputs = {t: TeacherGeneration(t, finished=True, num_tokens=1) for t in ("b", "a", "c")}
    chats = [None, [{"role": "user", "content": "b"}], [{"role": "user", "content": "a"}], None,
             [{"role": "user", "content": "c"}], None]  # fmt: skip
    complete(tok, draw, REFERENCES, chats, teacher, **options)
    assert [m[-1]["content"] for m in teacher.calls[-1][0]] == ["a", "b", "c"]


def test_mixed_source_uses_references_where_rows_have_them():
    tok = load_packaged_tokenizer("qwen")
    prompts = [f"q{i}" for i in range(len(REFERENCES))]
    teacher = RecordingTeacher({"q1": TeacherGeneration("from the teacher", finished=True, num_tokens=3)})
    draw = draw_off_policy(REFERENCES, gold("reference_or_teacher"), SEED, STEP)
    out = complete(
        tok,
        draw,
        REFERENCES,
        prompts,
        teacher,
        max_new_tokens=8,
        temperature=0.0,
        top_p=1.0,
        seed=SEED,
        step=STEP,
    )
    assert [asked for asked, _ in teacher.calls] == [["q1"]] and teacher.calls[0][1].greedy
    assert out.response_ids[1] == encode_continuation(tok, "from the teacher") + [tok.eos_token_id]
    assert out.response_ids[2] == encode_continuation(tok, "c") + [tok.eos_token_id]
    assert out.response_ids[4] == encode_continuation(tok, "e") + [tok.eos_token_id]
    assert (as_set(out.draw.teacher), as_set(out.draw.reference)) == ({1}, {2, 4})

    # The reference source never asks the teacher.
    silent = RecordingTeacher({})
    only_refs = complete(
        tok,
        draw_off_policy(REFERENCES, gold("reference"), SEED, STEP),
        REFERENCES,
        prompts,
        silent,
        max_new_tokens=8,
        temperature=1.0,
        top_p=1.0,
        seed=SEED,
        step=STEP,
    )
    assert silent.calls == [] and only_refs.response_ids[1] is None


def test_a_prompt_the_teacher_cannot_complete_is_trained_on_policy_and_counted(caplog):
    tok = load_packaged_tokenizer("qwen")
    prompts = [f"q{i}" for i in range(len(REFERENCES))]
    teacher = RecordingTeacher(
        {
            "q1": TeacherGeneration(
                "", False, error="the teacher's chat template rejected the messages: boom"
            ),
            "q2": TeacherGeneration("fine", True, 1),
            "q4": TeacherGeneration("also fine", True, 2),
        }
    )
    draw = draw_off_policy(REFERENCES, gold("teacher"), SEED, STEP)
    with caplog.at_level(logging.WARNING, logger="gold_plugin.step"):
        out = complete(
            tok,
            draw,
            REFERENCES,
            prompts,
            teacher,
            max_new_tokens=8,
            temperature=1.0,
            top_p=1.0,
            seed=0,
            step=0,
        )
    assert as_set(out.draw.off_policy) == as_set(out.draw.teacher) == {2, 4}
    assert as_set(out.draw.missing_reference) == {1} and out.response_ids[1] is None
    assert "prompt 1" in caplog.text and "boom" in caplog.text


def test_a_teacher_without_generate_is_a_clear_error():
    class ScoreOnly:
        def score(self, requests):
            return []

    draw = OffPolicyDraw(np.array([True]), np.array([True]), np.array([False]))
    with pytest.raises(TypeError, match="cannot generate"):
        complete(
            load_packaged_tokenizer("qwen"), draw, [None], ["q"], ScoreOnly(),
            max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0, step=0,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"off_policy_source": "teacher"}, "--gold.lmbda 1 trains every prompt on-policy"),
        ({"off_policy_source": "dataset", "lmbda": 0.5}, "off_policy_source must be one of"),
        ({"off_policy_source": "teacher", "lmbda": 0.5, "alpha": 0.0}, "--gold.alpha > 0"),
        ({"off_policy_source": "reference_or_teacher", "lmbda": 0.5, "alpha": 0.0}, "--gold.alpha > 0"),
    ],
)
def test_combinations_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(GoldConfigError, match=message):
        GoldConfig(teacher=TeacherConfig(topk=4), **kwargs)
    assert GoldConfig(lmbda=0.5, off_policy_source="teacher", teacher=TeacherConfig(topk=4)).teacher_generates
    assert not GoldConfig(
        lmbda=0.5, off_policy_source="teacher", teacher=TeacherConfig(topk=4)
    ).needs_references
    assert GoldConfig(
        lmbda=0.5, off_policy_source="reference_or_teacher", teacher=TeacherConfig(topk=4)
    ).needs_references


def test_the_completion_call_asks_nothing_without_teacher_rows_and_refuses_a_missing_prompt():
    none = draw_off_policy(REFERENCES, gold("reference"), SEED, STEP)
    call = teacher_completion_call(
        none, [None] * len(REFERENCES), max_new_tokens=None, temperature=1.0, top_p=1.0, seed=0, step=0
    )
    assert call.rows == () and call.prompts == [] and call.params is None
    teacher = draw_off_policy(REFERENCES, gold("teacher"), SEED, STEP)
    with pytest.raises(ValueError, match="length limit"):
        teacher_completion_call(
            teacher, ["q"] * 6, max_new_tokens=None, temperature=1.0, top_p=1.0, seed=0, step=0
        )
    with pytest.raises(ValueError, match="Prompt 1, drawn for a teacher completion"):
        teacher_completion_call(
            teacher, [None] * 6, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0, step=0
        )
    asked = teacher_completion_call(
        teacher, ["q"] * 6, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0, step=0
    )
    with pytest.raises(ValueError, match="2 teacher completions for 3 prompts"):
        off_policy_responses(
            load_packaged_tokenizer("qwen"), teacher, REFERENCES, asked, [TeacherGeneration("a", True)] * 2,
            max_new_tokens=4,
        )  # fmt: skip
