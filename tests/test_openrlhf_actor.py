"""GoldActorPPOTrainer: OpenRLHF's real actor training step, with the aligned logit loss added exactly once.

The trainer is OpenRLHF 0.11.2's ``ActorPPOTrainer`` (constructed by its own ``__init__``) around OpenRLHF's
``Actor`` on a tiny Llama with the Qwen tokenizer; the teacher top-k uses the Mistral vocabulary. Only the
DeepSpeed strategy (CUDA) is replaced by a small object with the same methods, and ``torch.cuda`` device calls
that OpenRLHF makes for bookkeeping are stubbed; a one-process gloo group stands in for the NCCL world.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.append(str(Path(__file__).parent / "stubs"))  # vllm / flash_attn import stand-ins when not installed

from openrlhf.trainer.ppo_utils.experience import (  # noqa: E402
    Experience,
    make_experience_batch,
    split_experience_batch,
)
from openrlhf_helpers import init_gloo, make_trainer  # noqa: E402

from gold_plugin.alignment import VocabMap  # noqa: E402
from gold_plugin.integrations.openrlhf.args import build_parser  # noqa: E402
from gold_plugin.integrations.openrlhf.experience_maker import (  # noqa: E402
    LOGIT_INPUTS_PREFIX,
    pack_logit_inputs,
)
from gold_plugin.integrations.openrlhf.launch_plan import resolve_launch  # noqa: E402
from gold_plugin.signals.logit import LogitLossInputs, LogitLossOptions  # noqa: E402
from gold_plugin.testing.references import aligned_logit_loss_reference  # noqa: E402
from gold_plugin.testing.tiny_teacher import save_tiny_teacher  # noqa: E402
from gold_plugin.testing.tokenizers import load_test_tokenizer  # noqa: E402

TOPK = 5
ALPHA, LOGIT_COEF = 0.5, 3.0


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    init_gloo(tmp_path_factory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, process_group):
    student_dir = save_tiny_teacher(tmp_path_factory.mktemp("student"), "qwen", seed=5)
    argv = (
        f"--actor.model_name_or_path {student_dir} --gold.teacher.model_name_or_path /nonexistent/teacher "
        f"--data.prompt_dataset unused.jsonl --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 2 "
        f"--algo.kl.init_coef 0 --vllm.num_engines 1 --gold.signal both --gold.teacher.topk {TOPK} "
        "--gold.logit_projection vocab "
        f"--gold.alpha {ALPHA} --gold.logit_coef {LOGIT_COEF} --gold.uld_student_temperature 1.5 "
        "--actor.num_gpus_per_node 1 --reward.remote_url /unused/reward_func.py"
    ).split()
    plan = resolve_launch(build_parser().parse_args(argv))
    student_tok, teacher_tok = load_test_tokenizer("qwen"), load_test_tokenizer("mistral")
    mapping = VocabMap(student_tok, teacher_tok).teacher_to_student_tensor()
    return SimpleNamespace(plan=plan, student_dir=student_dir, mapping=mapping, tok=student_tok)


def _experience(setup, actor) -> tuple[Experience, list[tuple[int, int, torch.Tensor, torch.Tensor]]]:
    """Two right-padded rollouts with teacher top-k at some response positions (packed by the experience maker's
    :func:`pack_logit_inputs`), after OpenRLHF's replay path; and the positions as (row, action column, ids,
    log-probs)."""
    tok = setup.tok
    g = torch.Generator().manual_seed(0)
    rows, expected = [], []
    for row, (prompt, response, positions) in enumerate(
        (("Add 2 and 2.", "It is 4, clearly.", [0, 2, 3]), ("Hi!", "Hello there", [1]))
    ):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([p_ids + r_ids])
        length = seq.shape[1]
        action_mask = torch.zeros(1, length - 1, dtype=torch.long)
        action_mask[0, len(p_ids) - 1 :] = 1
        with torch.no_grad():
            old = actor(seq, action_mask, torch.ones_like(seq))
        cols, ids, logprobs = [], [], []
        for j in positions:
            col = len(p_ids) - 1 + j
            top = torch.randint(3, 32000, (TOPK,), generator=g)
            top[-1] = -1  # an empty slot
            cols.append(col)
            ids.append(top)
            logprobs.append(torch.randn(TOPK, generator=g).log_softmax(-1) - 0.2)
            expected.append((row, col, ids[-1], logprobs[-1]))
        inputs = LogitLossInputs(
            positions=torch.tensor([[0, c] for c in cols]),
            teacher_topk_ids=torch.stack(ids),
            teacher_topk_logprobs=torch.stack(logprobs),
            sample_index=torch.zeros(len(cols), dtype=torch.int64),
        )
        rows.append(
            Experience(
                sequences=seq,
                attention_mask=torch.ones_like(seq),
                action_mask=action_mask,
                action_log_probs=old,
                advantages=torch.randn(1, length - 1, generator=g) * action_mask,
                response_length=torch.tensor([len(r_ids)]),
                total_length=torch.tensor([length]),
                info={**pack_logit_inputs(inputs, 1), "gold/sampled_kl": torch.tensor([0.25])},
            )
        )
    batch = Experience.concat_experiences(rows, tok.pad_token_id)
    items = split_experience_batch(batch)
    return make_experience_batch(
        items
    ), expected  # what the replay buffer's collate_fn hands to training_step


def _logit_keys(info) -> list[str]:
    return [k for k in info if k.startswith(LOGIT_INPUTS_PREFIX)]


def _grads(actor):
    return {n: p.grad.detach().clone() for n, p in actor.named_parameters() if p.grad is not None}


def test_logit_loss_is_added_once_and_its_gradient_reaches_the_actor(setup, monkeypatch):
    plain, plain_strategy, plain_actor = make_trainer(setup, monkeypatch, gold=False)
    experience, expected = _experience(setup, plain_actor)
    plain_exp, _ = _experience(setup, plain_actor)
    for key in _logit_keys(plain_exp.info):
        plain_exp.info.pop(key)
    plain_status = plain.training_step(plain_exp, 0.0, 0)
    plain_grads = _grads(plain_actor)

    gold, gold_strategy, gold_actor = make_trainer(setup, monkeypatch, gold=True)
    assert _logit_keys(experience.info)
    status = gold.training_step(experience, 0.0, 0)
    gold_grads = _grads(gold_actor)

    assert len(plain_strategy.losses) == 1 and len(gold_strategy.losses) == 1  # one backward, loss added once
    assert not _logit_keys(experience.info)

    # Independent expectation: the reference (full-vocabulary) loss at the same positions, normalised per action token.
    actor = gold_actor
    actor.zero_grad()
    seqs, attn = experience.sequences, experience.attention_mask
    position_ids = attn.long().cumsum(-1) - 1
    logits = actor.model(seqs, attention_mask=attn, position_ids=position_ids.clamp(min=0))["logits"].float()
    rows = [r for r, *_ in expected]
    cols = [c for _, c, *_ in expected]  # action column j is predicted by the logits at position j
    assert len(rows) == 4
    expected_per_position = aligned_logit_loss_reference(
        logits[rows, cols],
        torch.stack([e[2] for e in expected]),
        torch.stack([e[3] for e in expected]),
        setup.mapping,
        options=LogitLossOptions.from_config(setup.plan.gold),
    )
    num_tokens = experience.action_mask.sum()
    extra = ALPHA * LOGIT_COEF * expected_per_position.sum() / num_tokens
    torch.testing.assert_close(
        gold_strategy.losses[0] - plain_strategy.losses[0], extra.detach(), atol=1e-5, rtol=1e-4
    )

    extra.backward()
    expected_grads = _grads(actor)
    head = "model.lm_head.weight"
    assert head in gold_grads and expected_grads[head].abs().sum() > 0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(gold_grads[name] - plain_grads[name], grad, atol=1e-5, rtol=1e-3)

    metrics = status["metrics"]
    torch.testing.assert_close(
        metrics["gold/logit_loss"], expected_per_position.detach().mean(), atol=1e-5, rtol=1e-4
    )
    assert float(metrics["gold/logit_positions"]) == 2.0  # 4 positions in 2 samples
    assert "gold/projection_remainder" not in metrics  # the vocabulary-map loss has no remainder bucket
    assert "gold/sampled_kl" in metrics and "gold/logit_loss" not in plain_status["metrics"]


def test_advantage_only_signal_leaves_openrlhf_training_step_unchanged(setup, monkeypatch):
    gold, strategy, actor = make_trainer(setup, monkeypatch, gold=True)
    gold.gold = resolve_launch(
        build_parser().parse_args(
            f"--actor.model_name_or_path {setup.student_dir} --gold.teacher.model_name_or_path /x "
            "--data.prompt_dataset d --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 2 "
            "--algo.kl.init_coef 0 --vllm.num_engines 1 --actor.num_gpus_per_node 1 --gold.signal advantage".split()
        )
    ).gold
    experience, _ = _experience(setup, actor)
    status = gold.training_step(experience, 0.0, 0)
    assert len(strategy.losses) == 1
    assert "gold/logit_loss" not in status["metrics"]
    assert not _logit_keys(experience.info)  # still popped: OpenRLHF could not log a per-position list
