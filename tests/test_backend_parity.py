"""One batch through both backends' code paths: identical advantages, logit loss and metrics.

The OpenRLHF path is the real OpenRLHF 0.11.2 experience pipeline (``GoldExperienceMaker`` inside OpenRLHF's
``make_experience_batch``, then OpenRLHF's replay-buffer collate and ``GoldActorPPOTrainer.training_step``), with
the CPU scaffolding of ``test_openrlhf_experience.py`` / ``test_openrlhf_actor.py``. The local path is
``LocalTrainer.make_rollout`` / ``make_experience`` / ``micro_batch_loss`` on the same student weights, the same
teacher and the same responses (its sampler is replaced by one that returns them). The configuration exercises
every part of the GOLD step: alpha 0.5 with group_norm rewards, ``--gold.signal both``, ``kl_discount`` 0.5,
whitened distillation advantages, and ``lmbda`` 0.5 with one drawn prompt that has no reference completion; then
the same with the off-policy completions written by the teacher, and with the hidden-state loss.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from openrlhf_helpers import (
    REWARDS,
    ROWS,
    TOPK,
    build_models,
    init_gloo,
    make_makers,
    make_plan,
    make_rollouts,
    make_trainer,
)

from gold_plugin.local.config import LocalTrainConfig
from gold_plugin.local.modeling import Rollout
from gold_plugin.local.trainer import LocalTrainer
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.step import per_unit_means, sum_per_sample_key, teacher_requests
from gold_plugin.teacher import HFTeacher

# local_ray: the stand-in actor groups return Ray object refs, as OpenRLHF's do (without it, ray.put would start a
# full Ray that outlives the module).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

# Seed 42 at step 0 draws 2 of the 3 prompts (round(0.5 * 3) = 2) in the order of their texts ("Name ...",
# "Spell ...", "What ..."): the first and the third, i.e. ROWS[1], trained off-policy on its reference, and
# ROWS[0], which has no reference completion (trained on-policy, counted).
PARITY_ROWS = [dict(row, output=row["label"]) for row in ROWS]
del PARITY_ROWS[0]["output"]
OPTIONS = (
    "--gold.signal both --gold.advantage_norm whiten --gold.lmbda 0.5 --data.output_key output "
    "--rollout.max_new_tokens 32"
)
TIMING = (
    "gold/teacher_seconds",
    "gold/teacher_wait_seconds",
    "gold/plugin_seconds",
    "gold/teacher_generation_seconds",
)


def _split(sequence: torch.Tensor, action_mask: torch.Tensor) -> tuple[tuple, tuple]:
    """(prompt ids, response ids) of one OpenRLHF row."""
    mask = action_mask.bool()
    start = int(torch.nonzero(mask)[0]) + 1
    return tuple(sequence[:start].tolist()), tuple(sequence[1:][mask].tolist())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    init_gloo(tmp_path_factory)
    return build_models(tmp_path_factory)


@pytest.fixture(scope="module")
def teacher(models):
    """The teacher both backends call: in-process, with the top-k the logit loss needs."""
    return HFTeacher(
        str(models.teacher_dir), device="cpu", tokenizer=load_packaged_tokenizer("mistral"), topk=TOPK
    )


@pytest.fixture(scope="module", params=[1.0, 0.7], ids=["temperature_1", "temperature_0.7"])
def openrlhf_side(models, teacher, request):
    """At a rollout temperature other than 1 both backends divide the logits by it for the policy; the logit loss
    sees the model's own distribution in both (docs/signals.md)."""
    plan = make_plan(models, alpha=0.5, extra=f"{OPTIONS} --rollout.temperature {request.param}")
    maker, _, strategy, tok = make_makers(models, teacher, plan, rows=PARITY_ROWS)
    experiences = maker.make_experience_batch(make_rollouts(strategy, tok, unknown_prompt=False))
    return plan, experiences


class _FixedSampler:
    """Stands in for the local backend's ``sample``: returns the test's responses for the prompts asked."""

    def __init__(self, responses: dict[tuple, list[list[int]]]):
        self.responses = responses

    def __call__(self, model, tokenizer, prompt_ids, *, n_samples_per_prompt, **_):
        rollout = Rollout([], [], [], [])
        for index, prompt in enumerate(prompt_ids):
            for response in self.responses[tuple(prompt)][:n_samples_per_prompt]:
                rollout.prompt_index.append(index)
                rollout.prompt_ids.append(list(prompt))
                rollout.response_ids.append(response)
                rollout.ends_with_eos.append(False)
        return rollout


def _local_side(models, teacher, plan, monkeypatch) -> tuple[LocalTrainer, Any]:
    tok = load_packaged_tokenizer("qwen")
    sampled: dict[tuple, list[list[int]]] = {}
    rewards: dict[tuple, float] = {}
    for sample, reward in zip(
        make_rollouts(SimpleNamespace(args=plan.args), tok, unknown_prompt=False), REWARDS
    ):
        prompt_ids, response = _split(sample.sequences[0], sample.action_mask[0])
        sampled.setdefault(prompt_ids, []).append(list(response))
        [request] = teacher_requests(tok, [list(response)], [None])
        rewards[(sample.prompts[0], request.response)] = reward

    def reward_func(queries, prompts, labels):
        return torch.tensor(
            [rewards.get((p, q[len(p) :]), 0.0) for q, p in zip(queries, prompts)]
        )  # 0: references

    monkeypatch.setattr("gold_plugin.local.trainer.sample", _FixedSampler(sampled))
    config = LocalTrainConfig(
        student=str(models.student_dir),
        prompts=PARITY_ROWS,
        input_key="input",
        label_key="label",
        output_key="output",
        apply_chat_template=True,
        rollout_batch_size=len(PARITY_ROWS),
        n_samples_per_prompt=2,
        max_new_tokens=plan.args.rollout.max_new_tokens,
        temperature=plan.args.rollout.temperature,
        seed=plan.args.train.seed,
        advantage_estimator="group_norm",
        reward_func=reward_func,
        device="cpu",
        no_progress=True,
    )
    trainer = LocalTrainer(config, plan.gold, teacher, load_packaged_tokenizer("mistral"))
    rollout, off, missing = trainer.make_rollout(PARITY_ROWS, step=0)
    experience = trainer.make_experience(PARITY_ROWS, rollout, off, missing)
    return trainer, experience


def _assert_same_advantages(experiences: list, local) -> dict[tuple, torch.Tensor]:
    """Advantages, sample by sample, keyed by (prompt ids, response ids) since the backends order samples
    differently: the same samples and values in both; OpenRLHF's, by key."""
    ours = {}
    for exp in experiences:
        for b in range(exp.sequences.shape[0]):
            ours[_split(exp.sequences[b], exp.action_mask[b])] = exp.advantages[b][exp.action_mask[b].bool()]
    theirs = {
        (tuple(prompt_ids), tuple(response)): local.advantages[i][local.mask[i]]
        for i, (prompt_ids, response) in enumerate(zip(local.rollout.prompt_ids, local.rollout.response_ids))
    }
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], atol=2e-5, rtol=1e-4)
    return ours


def _assert_same_step_metrics(experiences: list, local) -> dict[str, float]:
    """Step metrics: the same names, and the same values (OpenRLHF logs each per-sample info entry's mean)."""
    logged = {
        key: float(torch.cat([exp.info[key] for exp in experiences]).double().mean())
        for key in experiences[0].info
        if key.startswith("gold/") and key not in TIMING
    }
    local_logged = {k: v for k, v in local.metrics.items() if k.startswith("gold/") and k not in TIMING}
    assert set(logged) == set(local_logged) and "gold/missing_reference" in logged
    for key, value in logged.items():
        assert local_logged[key] == pytest.approx(value, abs=1e-5), key
    return logged


def test_both_backends_give_identical_advantages_logit_loss_and_metrics(
    models, teacher, openrlhf_side, monkeypatch
):
    plan, experiences = openrlhf_side
    trainer, local = _local_side(models, teacher, plan, monkeypatch)
    tok = trainer.tokenizer

    ours = _assert_same_advantages(experiences, local)
    assert len(ours) == 5  # ROWS[1]'s two samples are one reference completion
    off_policy = [k for k in ours if ours[k].abs().sum() == 0]
    assert len(off_policy) == 1 and tok.decode(list(off_policy[0][1])) == "croissant<|im_end|>"

    logged = _assert_same_step_metrics(experiences, local)
    assert logged["gold/off_policy"] == pytest.approx(2 / 6) and logged[
        "gold/missing_reference"
    ] == pytest.approx(2 / 6)

    # The logit loss of one optimiser step holding the whole batch: the term added to the loss, and its metrics.
    setup = SimpleNamespace(
        plan=plan,
        student_dir=models.student_dir,
        tok=tok,
        mapping=trainer.losses["logit"].vocab.teacher_to_student,
        vocab=trainer.losses["logit"].vocab,
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer

    buffer = NaiveReplayBuffer(sample_batch_size=6, cpu_offload=False)
    for exp in copy.deepcopy(experiences):
        buffer.append(exp)
    batch = buffer.collate_fn([buffer[i] for i in range(len(buffer))])
    plain_batch = copy.deepcopy(batch)
    for key in [k for k in plain_batch.info if k.startswith("gold_logit.")]:
        plain_batch.info.pop(key)
    plain, plain_strategy, _ = make_trainer(setup, monkeypatch, gold=False)
    plain.training_step(plain_batch, 0.0, 0)
    gold, gold_strategy, _ = make_trainer(setup, monkeypatch, gold=True)
    status = gold.training_step(batch, 0.0, 0)
    openrlhf_term = float(gold_strategy.losses[0] - plain_strategy.losses[0])

    everything = list(range(len(local.rollout.response_ids)))
    loss, local_metrics = trainer.micro_batch_loss(local, everything, float(local.mask.sum()))
    local_term = float(loss.detach()) - local_metrics["train/policy_loss"]
    assert openrlhf_term > 0
    assert local_term == pytest.approx(openrlhf_term, rel=1e-4, abs=1e-6)
    for key in ("gold/logit_loss", "gold/logit_positions", "gold/projection_remainder"):
        key = key if key == "gold/logit_positions" else sum_per_sample_key(key)
        assert local_metrics[key] == pytest.approx(float(status["metrics"][key]), rel=1e-4), key
    remainder = per_unit_means(local_metrics)["gold/projection_remainder"]
    assert 0.0 < remainder < 1.0  # the byte projection (the default)


def test_both_backends_train_the_same_teacher_written_off_policy_samples(models, teacher, monkeypatch):
    """``--gold.off_policy_source teacher``: both backends ask the teacher for the drawn prompts' completions in one
    seeded call, in the same order, so they train on the same completions (re-tokenised by the student), with the
    same advantages (0 on those samples) and the same metrics."""
    plan = make_plan(models, alpha=0.5, extra=f"{OPTIONS} --gold.off_policy_source teacher")
    maker, _, strategy, tok = make_makers(models, teacher, plan, rows=PARITY_ROWS)
    experiences = maker.make_experience_batch(make_rollouts(strategy, tok, unknown_prompt=False))
    trainer, local = _local_side(models, teacher, plan, monkeypatch)

    ours = _assert_same_advantages(experiences, local)
    # Two drawn prompts, each trained on one teacher completion (both of its samples: one key), none a reference.
    written = [key for key, value in ours.items() if value.abs().sum() == 0]
    assert len(written) == 2 and len({prompt for prompt, _ in written}) == 2
    assert all(tok.decode(list(response)) != "croissant<|im_end|>" for _, response in written)
    # The local backend logs the teacher's generation call with the rollout (OpenRLHF: on every sample).
    step_metrics = SimpleNamespace(metrics={**local.metrics, **trainer.rollout_metrics})
    logged = _assert_same_step_metrics(experiences, step_metrics)
    assert logged["gold/teacher_generation_retries"] == 0.0
    assert logged["gold/off_policy_teacher"] == pytest.approx(4 / 6) and logged[
        "gold/off_policy"
    ] == pytest.approx(4 / 6)
    assert logged["gold/off_policy_reference"] == 0.0


HIDDEN_RANK = 8
HIDDEN_OPTIONS = (
    f"{OPTIONS} --gold.hidden_state_coef 1 --gold.teacher.hidden_state_layers 2 "
    f"--gold.teacher.hidden_state_rank {HIDDEN_RANK}"
)


def test_both_backends_give_the_same_hidden_state_loss_bridge_and_metrics(models, monkeypatch):
    """The hidden-state loss on top of the logit loss: the same per-sample metrics, the same bridge fitted on the
    first step's group ends (OpenRLHF: on the actor's replay buffer, before any update), the same loss term
    (logit + hidden) and the same hidden-state metrics."""
    teacher = HFTeacher(
        str(models.teacher_dir),
        device="cpu",
        tokenizer=load_packaged_tokenizer("mistral"),
        topk=TOPK,
        hidden_state_layers=2,
        hidden_state_rank=HIDDEN_RANK,
    )
    plan = make_plan(models, alpha=0.5, extra=HIDDEN_OPTIONS)
    assert plan.gold.uses_hidden_states
    maker, _, strategy, tok = make_makers(models, teacher, plan, rows=PARITY_ROWS)
    experiences = maker.make_experience_batch(make_rollouts(strategy, tok, unknown_prompt=False))
    trainer, local = _local_side(models, teacher, plan, monkeypatch)
    logged = _assert_same_step_metrics(experiences, local)
    assert logged["gold/hidden_state_groups"] > 1

    setup = SimpleNamespace(
        plan=plan,
        student_dir=models.student_dir,
        tok=trainer.tokenizer,
        mapping=trainer.losses["logit"].vocab.teacher_to_student,
        vocab=trainer.losses["logit"].vocab,
    )
    plain, plain_strategy, _ = make_trainer(setup, monkeypatch, gold=False)
    gold, gold_strategy, _ = make_trainer(setup, monkeypatch, gold=True)
    hidden, local_hidden = gold.losses["hidden_state"], trainer.losses["hidden_state"]
    assert hidden.student_layers == local_hidden.student_layers and hidden.student_layers
    for exp in copy.deepcopy(experiences):
        gold.replay_buffer.append(exp)
    items = [gold.replay_buffer[i] for i in range(len(gold.replay_buffer))]
    batch = gold.replay_buffer.collate_fn(items)
    plain_batch = copy.deepcopy(batch)
    for key in [k for k in plain_batch.info if k.startswith(("gold_logit.", "gold_hidden_state."))]:
        plain_batch.info.pop(key)

    # The bridge: fitted on the step's group ends by both, before any update.
    fitted = gold.fit_signals()
    local_fitted = trainer.fit_signals(local)
    assert gold.fit_signals() == {}  # once
    # --gold.hidden_state_bridge refit: fitted again (the same states, the same map).
    refit = copy.copy(hidden)
    refit.gold = dataclasses.replace(refit.gold, hidden_state_bridge="refit")
    gold.losses = {**gold.losses, "hidden_state": refit}
    assert gold.fit_signals() == pytest.approx(fitted, rel=1e-6)
    gold.losses = {**gold.losses, "hidden_state": hidden}
    ours, theirs = hidden.state_dict(), local_hidden.state_dict()
    assert set(ours) == set(theirs) and ours["student_map"].shape[-1] == HIDDEN_RANK
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=1e-3, msg=key)
    for key in ("gold/hidden_bridge_fit", "gold/hidden_bridge_groups"):
        assert fitted[key] == pytest.approx(local_fitted[key], rel=1e-4, abs=1e-5), key
    assert fitted["gold/hidden_bridge_groups"] == pytest.approx(
        logged["gold/hidden_state_groups"] * len(items)
    )

    # One optimiser step holding the whole batch: the GOLD terms (logit + hidden) and the hidden-state metric.
    plain.training_step(plain_batch, 0.0, 0)
    status = gold.training_step(batch, 0.0, 0)
    openrlhf_term = float(gold_strategy.losses[0] - plain_strategy.losses[0])
    everything = list(range(len(local.rollout.response_ids)))
    loss, local_metrics = trainer.micro_batch_loss(local, everything, float(local.mask.sum()))
    local_term = float(loss.detach()) - local_metrics["train/policy_loss"]
    assert local_metrics[sum_per_sample_key("gold/hidden_state_loss")] > 0
    assert local_term == pytest.approx(openrlhf_term, rel=1e-4, abs=1e-6)
    for key in (
        *map(sum_per_sample_key, ("gold/hidden_state_loss", "gold/logit_loss")),
        "gold/logit_positions",
    ):
        assert local_metrics[key] == pytest.approx(float(status["metrics"][key]), rel=1e-4), key
