"""Steps without any distillation signal: counted reasons on the console, and a stop after several in a row."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from gold_plugin.config import GoldConfig, GoldConfigError, TeacherConfig
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.step import align_results, distill_advantages
from gold_plugin.step.no_signal import NoDistillationSignalError, NoSignalWatch, no_signal_reasons
from gold_plugin.teacher.tokenizer import check_teacher_chat_template
from gold_plugin.teacher.types import TeacherResult

REJECTED = "the prompt is chat messages but the teacher tokenizer has no chat template"


def _result(ids, logprobs, truncated=0):
    n = len(ids)
    return TeacherResult(
        token_ids=np.asarray(ids, dtype=np.int64),
        token_bytes=np.ones(n, dtype=np.int64),
        logprobs=np.asarray(logprobs, dtype=np.float32),
        num_masked=int(np.isnan(logprobs).sum()),
        num_prompt_truncated=truncated,
    )


def _step(results):
    """Aligned batch and signal mask of three gpt2 responses scored by a same-tokenizer 'teacher'."""
    tok = load_packaged_tokenizer("gpt2")
    ids = [np.asarray(tok(t)["input_ids"]) for t in (" one two three", " four five", " six")]
    gold = GoldConfig(signal="advantage")
    aligned = align_results(tok, tok, ids, results(ids), gold)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for b, x in enumerate(ids):
        mask[b, : len(x)] = True
    _, signal = distill_advantages(aligned, torch.full(mask.shape, -1.0) * mask, mask, gold)
    return aligned, signal


def _dead(ids):
    return [
        TeacherResult.failed(REJECTED, 0),
        _result(ids[1], [-1.0] * len(ids[1]), truncated=37),
        _result(ids[2], [np.nan] * len(ids[2])),  # nothing fitted the teacher's context
    ]


def _alive(ids):
    return [_result(x, [-1.0] * len(x)) for x in ids]


def test_reasons_are_counted_per_sample_without_signal():
    aligned, signal = _step(_dead)
    assert not signal.any()
    reasons = no_signal_reasons(aligned, signal)
    assert reasons == {
        f"teacher: {REJECTED}": 1,
        "the teacher's prompt was cut to fit its context (raise --gold.teacher.max_len or shorten prompts)": 1,
        "no group the teacher scored: the response does not fit the teacher's context": 1,
    }
    aligned, signal = _step(_alive)
    assert signal.any(dim=1).all() and no_signal_reasons(aligned, signal) == {}


def test_the_watch_reports_each_empty_step_and_stops_after_several_in_a_row():
    dead, alive = _step(_dead), _step(_alive)
    watch = NoSignalWatch(max_steps=3)
    first = watch.observe(1, [dead, dead])  # two micro-batches: six samples
    assert first.startswith(
        "GOLD step 1: none of the 6 samples got a distillation signal (1 step(s) in a row)"
    )
    assert f"2 x teacher: {REJECTED}" in first
    assert watch.observe(2, [dead]) is not None
    assert watch.observe(3, [alive]) is None and watch.steps_without_signal == 0  # a step with signal resets
    watch.observe(4, [dead])
    watch.observe(5, [dead])
    with pytest.raises(
        NoDistillationSignalError, match=r"GOLD step 6: .*3 step\(s\) in a row.*Stopping: 3 steps"
    ):
        watch.observe(6, [dead])
    never = NoSignalWatch(max_steps=0)
    assert all(never.observe(step, [dead]) is not None for step in range(10))
    with pytest.raises(GoldConfigError, match="max_steps_without_signal"):
        GoldConfig(max_steps_without_signal=-1)


def test_chat_prompts_need_a_teacher_template():
    qwen = load_packaged_tokenizer("qwen")  # has a chat template
    base = copy.deepcopy(load_packaged_tokenizer("gpt2"))  # the loaded tokenizer is shared: change a copy
    base.chat_template = None
    gold = GoldConfig(teacher=TeacherConfig(model_name_or_path="/models/base-teacher"))
    with pytest.raises(
        GoldConfigError, match=r"'/models/base-teacher' has no chat template.*chat_template student"
    ):
        check_teacher_chat_template(gold, base, chat_prompts=True)
    check_teacher_chat_template(gold, base, chat_prompts=False)  # text prompts reach it verbatim
    student_text = GoldConfig(teacher=TeacherConfig(chat_template="student"))
    check_teacher_chat_template(student_text, base, chat_prompts=True)
    check_teacher_chat_template(gold, qwen, chat_prompts=True)
    check_teacher_chat_template(
        dataclasses.replace(gold, alpha=0.0), base, chat_prompts=True
    )  # no teacher asked
