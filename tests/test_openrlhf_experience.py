"""GoldExperienceMaker inside OpenRLHF 0.11.2's real experience pipeline, on CPU.

Rollouts are turned into ``Experience`` objects by OpenRLHF's own ``SamplesGenerator._process_response_into_experience``
and go through OpenRLHF's ``make_experience_batch`` (split into micro-batches, model forwards, advantages). The
teacher is a real :class:`TeacherGroup` (one Ray actor) around a tiny Llama with the Mistral SentencePiece
tokenizer; the student is a tiny Llama with the Qwen byte-level tokenizer. Only the DeepSpeed model groups (which
need CUDA) are replaced by in-process objects with the same ``async_run_method_batch`` calls, running OpenRLHF's
``Actor`` forward on CPU.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.append(str(Path(__file__).parent / "stubs"))  # vllm / flash_attn import stand-ins when not installed

ray = pytest.importorskip("ray")

from openrlhf.trainer.ppo_utils.experience import balance_experiences  # noqa: E402
from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer  # noqa: E402
from openrlhf_helpers import (  # noqa: E402
    RESPONSES,
    ROWS,
    build_models,
    chat_prompt,
    make_makers,
    make_plan,
    make_rollouts,
    rollout_sample,
)

from gold_plugin.alignment import align, text_for_teacher  # noqa: E402
from gold_plugin.integrations.openrlhf.transport import (  # noqa: E402
    LOGIT_INPUTS_PREFIX,
    pop_packed,
    unpack_logit_inputs,
)
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer  # noqa: E402
from gold_plugin.signals.logit import LogitLossInputs, ProjectionPositions  # noqa: E402
from gold_plugin.teacher import TeacherGroup, TeacherRequest, TeacherScorer  # noqa: E402
from gold_plugin.testing.references import group_advantages_reference  # noqa: E402

# One Ray teacher actor + tiny models: ~1-2 min on 2 cores. local_ray for every test: the stand-in actor groups return
# Ray object refs, as OpenRLHF's do.
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory)


@pytest.fixture(scope="module")
def teacher_group(local_ray, models):
    """A real TeacherGroup: one Ray actor running HFTeacher on CPU."""
    plan = make_plan(models, alpha=0.5, extra="--gold.signal both --gold.logit_projection vocab")
    group = TeacherGroup(plan.gold, scorer_overrides={"device": "cpu"})
    yield group
    group.close()


def _by_row(experiences):
    """{(prompt, response token tuple): (experience, row)} over a list of micro-batch experiences."""
    out = {}
    for exp in experiences:
        for b in range(exp.sequences.shape[0]):
            mask = exp.action_mask[b].bool()
            out[(exp.prompts[b], tuple(exp.sequences[b, 1:][mask].tolist()))] = (exp, b)
    return out


def _independent_distill_advantages(models, plan, key, exp, b, rows=ROWS):
    """Per-sample distillation advantages from the public per-sample functions, computed from scratch."""
    student_tok, teacher_tok = load_packaged_tokenizer("qwen"), load_packaged_tokenizer("mistral")
    prompt, response_ids = key
    response_ids = np.asarray(response_ids)
    ends = response_ids.size and int(response_ids[-1]) == student_tok.convert_tokens_to_ids("<|im_end|>")
    raw = next(
        (
            r["input"]
            for r in rows
            if student_tok.apply_chat_template(
                [{"role": "user", "content": r["input"]}], tokenize=False, add_generation_prompt=True
            )
            == prompt
        ),
        None,
    )
    teacher_prompt = [{"role": "user", "content": raw}] if raw is not None else prompt
    text = text_for_teacher(student_tok, response_ids[:-1] if ends else response_ids)
    [result] = models.local_teacher().score([TeacherRequest(teacher_prompt, text, ends_with_eos=bool(ends))])
    alignment = align(student_tok, response_ids, teacher_tok, result.token_ids, pair_eos=True)
    # the student's own log-probs of its response tokens, from a plain HF forward
    seq = exp.sequences[b][exp.attention_mask[b].bool()]
    with torch.no_grad():
        logprobs = models.student(seq[None]).logits[0].float().log_softmax(-1)
    start = seq.shape[0] - response_ids.size
    student_lp = logprobs[start - 1 : -1].gather(-1, seq[start:, None]).squeeze(-1)
    advantages = group_advantages_reference(
        alignment, student_lp, torch.from_numpy(result.logprobs), plan.gold.kl_discount
    )
    return advantages, raw, torch.from_numpy(alignment.student_group >= 0)


@pytest.mark.parametrize("norm", ["none", "whiten"])
def test_advantages_are_the_signal_functions_mixed_with_openrlhf_advantages(models, teacher_group, norm):
    plan = make_plan(models, alpha=0.5, extra=f"--gold.advantage_norm {norm} --gold.signal advantage")
    gold_maker, base_maker, strategy, student_tok = make_makers(models, teacher_group, plan)
    rollouts = make_rollouts(strategy, student_tok)
    gold_exps = gold_maker.make_experience_batch(copy.deepcopy(rollouts))
    base_exps = base_maker.make_experience_batch(copy.deepcopy(rollouts))
    gold_rows, base_rows = _by_row(gold_exps), _by_row(base_exps)
    assert len(gold_rows) == len(RESPONSES) == len(base_rows)
    independent = {
        key: _independent_distill_advantages(models, plan, key, *row) for key, row in gold_rows.items()
    }
    if norm == "whiten":  # over the signal tokens of the whole rollout (all micro-batches), by hand
        values = torch.cat([d[s].double() for d, _, s in independent.values()])
        mean, std = values.mean(), values.std(unbiased=False)
        independent = {
            k: (torch.where(s, (d - mean) / std, 0.0).float(), r, s) for k, (d, r, s) in independent.items()
        }
    checked_fallback = False
    for key, (exp, b) in gold_rows.items():
        base_exp, base_b = base_rows[key]
        distill, raw, _ = independent[key]
        mask = exp.action_mask[b].bool()
        expected = 0.5 * base_exp.advantages[base_b][mask] + 0.5 * 2.0 * distill
        torch.testing.assert_close(exp.advantages[b][mask], expected, atol=2e-5, rtol=1e-4)
        assert distill.abs().sum() > 0
        assert float(exp.info["gold/teacher_prompt_fallback"][b]) == float(raw is None)
        checked_fallback |= raw is None
        assert float(exp.info["gold/unaligned"][b]) == 0.0
        assert float(exp.info["gold/off_policy"][b]) == 0.0
        assert 0.5 < float(exp.info["gold/aligned_token_share"][b]) <= 1.0
        assert float(exp.info["gold/teacher_seconds"][b]) > 0
    assert checked_fallback


def test_reward_free_run_never_reads_rewards(models, teacher_group):
    plan = make_plan(
        models,
        alpha=1.0,
        extra="--algo.advantage.estimator reinforce --gold.advantage_norm none --gold.signal advantage",
    )
    assert plan.args.reward.remote_url is None
    gold_maker, _, strategy, student_tok = make_makers(models, teacher_group, plan)
    nan_rewards = [float("nan")] * len(RESPONSES)
    rollouts = make_rollouts(strategy, student_tok, rewards=nan_rewards)
    for sample in rollouts:  # as if no reward function ran: OpenRLHF would now ask the reward model
        sample.rewards = None
        sample.info.pop("reward")
    experiences = gold_maker.make_experience_batch(rollouts)
    for exp in experiences:
        assert torch.isfinite(exp.advantages).all()
        assert torch.equal(exp.info["reward"], torch.zeros(exp.sequences.shape[0]))
        for b in range(exp.sequences.shape[0]):
            key = (exp.prompts[b], tuple(exp.sequences[b, 1:][exp.action_mask[b].bool()].tolist()))
            distill, _, _ = _independent_distill_advantages(models, plan, key, exp, b)
            torch.testing.assert_close(
                exp.advantages[b][exp.action_mask[b].bool()], 2.0 * distill, atol=2e-5, rtol=1e-4
            )
    assert gold_maker.reward_model_group.calls == 0


@pytest.mark.parametrize(
    "estimator", ["group_norm", "rloo", "reinforce_baseline", "dr_grpo", "reinforce", "gae"]
)
def test_alpha_zero_reproduces_openrlhf_advantages_exactly(models, teacher_group, estimator):
    plan = make_plan(models, alpha=0.0, estimator=estimator)
    gold_maker, base_maker, strategy, student_tok = make_makers(
        models, teacher_group, plan, critic=estimator == "gae"
    )
    rollouts = make_rollouts(strategy, student_tok)
    gold_exps = gold_maker.make_experience_batch(copy.deepcopy(rollouts))
    # The GOLD maker hands OpenRLHF the samples stably sorted by prompt: OpenRLHF alone gets them in that order.
    in_prompt_order = sorted(rollouts, key=lambda s: s.prompts[0])
    assert [s.prompts for s in in_prompt_order] != [s.prompts for s in rollouts]
    base_exps = base_maker.make_experience_batch(copy.deepcopy(in_prompt_order))
    assert len(gold_exps) == len(base_exps)
    for gold_exp, base_exp in zip(gold_exps, base_exps):
        assert torch.equal(gold_exp.sequences, base_exp.sequences)
        assert torch.equal(gold_exp.advantages, base_exp.advantages)
        assert torch.equal(gold_exp.returns, base_exp.returns)
    assert any(exp.advantages.abs().sum() > 0 for exp in gold_exps)


def _logit_inputs_by_sample(experiences, cls=LogitLossInputs) -> dict:
    """{(prompt, response ids): (action columns, teacher top-k ids, log-probs)} of the packed logit inputs."""
    out = {}
    for exp in experiences:
        packed = {k: v for k, v in exp.info.items() if k.startswith(LOGIT_INPUTS_PREFIX)}
        inputs = unpack_logit_inputs(packed)
        assert isinstance(inputs, cls)  # the type tag names the bundle
        for key, (_, b) in _by_row([exp]).items():
            mine = inputs.sample_index == b
            out[key] = (
                inputs.positions[mine, 1],
                inputs.teacher_topk_ids[mine],
                inputs.teacher_topk_logprobs[mine],
            )
    return out


def test_logit_inputs_survive_openrlhf_batching_and_replay_buffer(models, teacher_group, monkeypatch):
    plan = make_plan(models, alpha=0.5, extra="--gold.signal both --gold.logit_projection vocab")
    gold_maker, _, strategy, student_tok = make_makers(models, teacher_group, plan)
    experiences = gold_maker.make_experience_batch(make_rollouts(strategy, student_tok))
    before = _logit_inputs_by_sample(experiences)
    for key, (exp, b) in _by_row(experiences).items():
        columns, ids, _ = before[key]
        assert columns.numel() > 0
        assert exp.action_mask[b][columns].all()  # never a position outside the response
        assert (ids >= 0).any(dim=1).all()  # every position has a teacher candidate

    balanced = balance_experiences(experiences, plan.args)  # the dynamic-batch path of OpenRLHF's trainer
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # NaiveReplayBuffer only names a device
    buffer = NaiveReplayBuffer(sample_batch_size=3, cpu_offload=False)
    for exp in balanced:
        buffer.append(exp)
    assert len(buffer) == len(RESPONSES)
    batch = buffer.collate_fn([buffer[i] for i in range(len(buffer))])
    after = _logit_inputs_by_sample([batch])
    assert set(after) == set(before)
    for key, (columns, ids, logprobs) in after.items():
        torch.testing.assert_close(columns, before[key][0], rtol=0, atol=0)
        assert torch.equal(ids, before[key][1]) and torch.equal(logprobs, before[key][2])
    assert pop_packed(batch) is not None
    assert not any(k.startswith(LOGIT_INPUTS_PREFIX) for k in batch.info)
    # What remains in info is what OpenRLHF's training step turns into logged metrics.
    for key, value in batch.info.items():
        assert torch.tensor(value, dtype=torch.float).shape == (len(RESPONSES),), key


def test_lmbda_replaces_a_share_of_the_prompts_by_their_reference_completion(models, teacher_group):
    plan = make_plan(
        models,
        alpha=1.0,
        extra="--algo.advantage.estimator reinforce --gold.signal both --gold.logit_projection vocab --gold.lmbda 0.5",
    )
    gold_maker, _, strategy, student_tok = make_makers(models, teacher_group, plan)
    gold_maker.reference_lookup.pop(next(iter(gold_maker.reference_lookup)))  # the first prompt has none
    experiences = gold_maker.make_experience_batch(make_rollouts(strategy, student_tok))
    rows = _by_row(experiences)
    eos = student_tok.eos_token_id
    off_keys = [k for k, (exp, b) in rows.items() if float(exp.info["gold/off_policy"][b]) == 1.0]
    inputs = _logit_inputs_by_sample(experiences)
    for exp in experiences:
        assert torch.equal(
            exp.info["gold/on_policy"] + exp.info["gold/off_policy"], torch.ones(len(exp.prompts))
        )
        assert (exp.info["gold/off_policy"][exp.info["gold/missing_reference"] > 0] == 0).all()
    # 4 distinct prompts (sample 4's prompt was changed), round(0.5 * 4) = 2 drawn from them in sorted order
    # ("Name a French pastry.", "Please spell ...", "Spell ...", "What is 3 + 4?"): with seed 42 at step 0 the first
    # (its two samples off-policy) and the last (whose reference was removed: trained on-policy, counted).
    off = sum(float(e.info["gold/off_policy"].sum()) for e in experiences)
    missing = sum(float(e.info["gold/missing_reference"].sum()) for e in experiences)
    assert (off, missing) == (2.0, 2.0)
    assert off_keys
    for key in off_keys:
        exp, b = rows[key]
        prompt, response = key
        label = next(r["label"] for r in ROWS if r["input"] in prompt)
        assert list(response) == student_tok(label, add_special_tokens=False)["input_ids"] + [eos]
        mask = exp.action_mask[b].bool()
        assert torch.equal(exp.advantages[b][mask], torch.zeros(int(mask.sum())))  # no policy gradient
        assert inputs[key][0].numel() > 0  # the logit loss trains on it
        assert float(exp.info["gold/unaligned"][b]) == 0.0
    on_advantages = [rows[k][0].advantages[rows[k][1]] for k in rows if k not in off_keys]
    assert any(a.abs().sum() > 0 for a in on_advantages)


def _off_policy_labels(maker, strategy, student_tok, reverse: bool = False) -> set[str]:
    """The labels of the prompts one rollout batch draws off-policy (the samples in OpenRLHF's order, or with the
    prompts in reverse order, each prompt's samples in theirs); the micro-batches do not depend on that order."""
    rollouts = make_rollouts(strategy, student_tok, unknown_prompt=False)
    order = [i ^ 1 for i in reversed(range(len(rollouts)))] if reverse else range(len(rollouts))
    batches = maker.split_rollout_samples([rollouts[i] for i in order])
    assert [b.prompts for b in batches] == [
        sorted(s.prompts[0] for s in rollouts)[i : i + 2] for i in (0, 2, 4)
    ]
    first_of_each = {}
    for batch in batches:  # each prompt's samples in their own order (OpenRLHF's group estimators need it)
        for prompt, sequence in zip(batch.prompts, batch.sequences):
            first_of_each.setdefault(prompt, sequence)
    assert all(torch.equal(first_of_each[s.prompts[0]], s.sequences[0]) for s in rollouts[::2])
    return {s.labels[0] for s in rollouts if float(s.info["gold/off_policy"][0]) == 1.0}


def test_a_resumed_maker_draws_what_the_uninterrupted_one_drew(models):
    """Stopped after 3 training steps and resumed at OpenRLHF's restored global step 3 (what the GOLD trainers set),
    the maker draws for the 4th batch the prompts the uninterrupted maker drew there, whatever the order vLLM
    returned the samples in."""
    plan = make_plan(models, alpha=1.0, extra="--algo.advantage.estimator reinforce --gold.lmbda 0.5")
    uninterrupted, _, strategy, student_tok = make_makers(models, None, plan)
    draws = [_off_policy_labels(uninterrupted, strategy, student_tok) for _ in range(4)]
    # 3 prompts, round(0.5 * 3) = 2 drawn, in sorted order (pastry, naïve, 3 + 4), seeded by (42, step).
    assert draws == [{"croissant", "7"}, {"naïve", "7"}, {"croissant", "7"}, {"croissant", "naïve"}]

    resumed, _, _, _ = make_makers(models, None, plan)
    resumed.draw_step = 3  # OpenRLHF's global step after 3 training steps, from its checkpoint
    assert _off_policy_labels(resumed, strategy, student_tok, reverse=True) == draws[3]
    restarted, _, _, _ = make_makers(
        models, None, plan
    )  # a counter that restarts at 0 would draw step 0's prompts
    assert _off_policy_labels(restarted, strategy, student_tok) == draws[0] != draws[3]


def test_teacher_scoring_is_in_flight_while_the_model_forwards_run(models, teacher_group):
    import threading

    plan = make_plan(models, alpha=0.5)
    gold_maker, _, strategy, student_tok = make_makers(models, teacher_group, plan)
    started, overlapped = threading.Event(), []

    class SignallingTeacher(TeacherScorer):
        def score(self, requests):
            started.set()
            return teacher_group.score(requests)

    actor_forward = gold_maker.actor_model_group.forward

    def forward_after_teacher_started(**kwargs):
        overlapped.append(
            started.wait(timeout=60)
        )  # would time out if the teacher were asked after the forwards
        return actor_forward(**kwargs)

    gold_maker.teacher = SignallingTeacher()
    gold_maker.actor_model_group.forward = forward_after_teacher_started
    experiences = gold_maker.make_experience_batch(make_rollouts(strategy, student_tok))
    assert overlapped and all(overlapped)
    assert all(exp.info["gold/unaligned"].sum() == 0 for exp in experiences)


def test_a_killed_teacher_replica_is_retried_counted_and_changes_nothing(models, teacher_group):
    """The group's only replica dies before a rollout's teacher call: the call restarts it and re-sends the share,
    ``gold/teacher_retries`` counts the re-send on every sample of the rollout, and every sample gets the same
    teacher-derived signal as in the unfaulted rollout."""
    plan = make_plan(models, alpha=0.5, extra="--gold.signal both --gold.logit_projection vocab")
    gold_maker, _, strategy, student_tok = make_makers(models, teacher_group, plan)
    rollouts = make_rollouts(strategy, student_tok)
    unfaulted = gold_maker.make_experience_batch(copy.deepcopy(rollouts))
    victim = teacher_group.replicas[0]
    ray.kill(victim)  # as the OOM killer would: no restart by Ray (max_restarts=0)
    faulted = gold_maker.make_experience_batch(copy.deepcopy(rollouts))
    assert teacher_group.replicas[0] is not victim

    for exp in unfaulted:
        assert torch.equal(exp.info["gold/teacher_retries"], torch.zeros(exp.sequences.shape[0]))
    for exp in faulted:
        assert torch.equal(exp.info["gold/teacher_retries"], torch.ones(exp.sequences.shape[0]))
        assert exp.info["gold/teacher_failed"].sum() == 0 and exp.info["gold/unaligned"].sum() == 0
    assert sum(exp.sequences.shape[0] for exp in faulted) == len(RESPONSES)
    before, after = _by_row(unfaulted), _by_row(faulted)
    assert before.keys() == after.keys()
    for key, (exp, b) in after.items():
        ref_exp, ref_b = before[key]
        torch.testing.assert_close(exp.advantages[b], ref_exp.advantages[ref_b], atol=0, rtol=0)
        for name, value in exp.info.items():
            if name.startswith(LOGIT_INPUTS_PREFIX) or (
                name.startswith("gold/") and name not in ("gold/teacher_retries",) and "seconds" not in name
            ):
                torch.testing.assert_close(value[b], ref_exp.info[name][ref_b], atol=0, rtol=0, msg=name)


BAD_ROWS = [
    {"input": "Say nothing at all.", "label": "-"},
    # About 300 teacher tokens: longer than the tiny teacher's 256-token context (its max_position_embeddings).
    {"input": "Summarise: " + "the quick brown fox jumps over the lazy dog " * 30, "label": "fox"},
]


def _bad_rollouts(strategy, student_tok) -> tuple[list, set, str]:
    """The helpers' six rollouts plus two prompts of bad samples (two samples each, as group_norm needs): an empty
    response and one of only special tokens; two answers to a prompt longer than the teacher's context. Returns
    the rollouts, the keys of the two empty responses and the long prompt."""
    end, start = (student_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>"))
    fox = student_tok("The fox jumps.", add_special_tokens=False)["input_ids"]
    bad = [  # (row, response ids, reward, ends with EOS)
        (BAD_ROWS[0], [end], 0.0, True),
        (BAD_ROWS[0], [start, end], 1.0, True),
        (BAD_ROWS[1], fox + [end], 1.0, True),
        (BAD_ROWS[1], fox[:2], 0.0, False),
    ]
    rollouts = make_rollouts(strategy, student_tok, unknown_prompt=False) + [
        rollout_sample(strategy, student_tok, chat_prompt(student_tok, row), row["label"], ids, reward, ends)
        for row, ids, reward, ends in bad
    ]
    empty = {(chat_prompt(student_tok, BAD_ROWS[0]), tuple(ids)) for ids in ([end], [start, end])}
    return rollouts, empty, chat_prompt(student_tok, BAD_ROWS[1])


def test_bad_samples_are_counted_and_the_rest_of_the_batch_trains_as_before(models, teacher_group):
    """Sample problems through OpenRLHF's real pipeline and a real Ray teacher: an empty response (EOS at once), a
    response of only special tokens, and a prompt longer than the teacher's context, beside good samples. No
    sample is dropped or raises; the empty and special-only responses keep the teacher's verdict on ending there
    (its end-of-turn right after the prompt, computed here from scratch) and are counted in
    ``gold/empty_response``; the long prompt's samples get no distillation signal (their advantages are exactly
    OpenRLHF's, times ``1 - alpha``; no logit-loss position) and are counted in ``gold/teacher_prompt_truncated``;
    every other sample gets exactly its own signal."""
    plan = make_plan(
        models, alpha=0.5, extra="--gold.advantage_norm none --gold.signal both --gold.logit_projection vocab"
    )
    rows = ROWS + BAD_ROWS
    gold_maker, base_maker, strategy, student_tok = make_makers(models, teacher_group, plan, rows=rows)
    rollouts, empty, long_prompt = _bad_rollouts(strategy, student_tok)
    gold_exps = gold_maker.make_experience_batch(copy.deepcopy(rollouts))
    base_exps = base_maker.make_experience_batch(copy.deepcopy(rollouts))
    gold_rows, base_rows = _by_row(gold_exps), _by_row(base_exps)
    assert len(gold_rows) == len(rollouts) == sum(e.sequences.shape[0] for e in gold_exps)
    inputs = _logit_inputs_by_sample(gold_exps)
    for key, (exp, b) in gold_rows.items():
        base_exp, base_b = base_rows[key]
        mask = exp.action_mask[b].bool()
        info = {name: float(exp.info[name][b]) for name in exp.info if name.startswith("gold/")}
        columns = inputs[key][0]
        assert info["gold/teacher_failed"] == 0.0 and info["gold/teacher_masked_tokens"] == 0.0
        assert info["gold/empty_response"] == float(key in empty)
        assert info["gold/teacher_prompt_truncated"] == float(key[0] == long_prompt)
        if key[0] == long_prompt:  # the teacher read a cut prompt: no signal, OpenRLHF's part only
            assert info["gold/unaligned"] == 1.0 and columns.numel() == 0
            torch.testing.assert_close(exp.advantages[b][mask], 0.5 * base_exp.advantages[base_b][mask])
            assert exp.advantages[b][mask].abs().sum() > 0  # the task-reward part still trains
            continue
        distill, _, _ = _independent_distill_advantages(models, plan, key, exp, b, rows=rows)
        expected = 0.5 * base_exp.advantages[base_b][mask] + 0.5 * 2.0 * distill
        torch.testing.assert_close(exp.advantages[b][mask], expected, atol=2e-5, rtol=1e-4)
        assert info["gold/unaligned"] == 0.0 and distill.abs().sum() > 0
        if key in empty:  # one logit-loss position: the EOS, predicted right after the prompt's end
            first = int(mask.nonzero()[0])
            assert columns.tolist() == [first + len(key[1]) - 1]
    metrics = {
        k: torch.cat([e.info[k] for e in gold_exps]).mean().item() for k in gold_exps[0].info if "/" in k
    }
    assert metrics["gold/empty_response"] == pytest.approx(2 / 10)
    assert metrics["gold/teacher_prompt_truncated"] == pytest.approx(2 / 10)


def test_a_micro_batch_without_logit_positions_reaches_the_actor(models, teacher_group, monkeypatch):
    """The long prompt's two samples make a rollout micro-batch without a single logit-loss position (the default
    byte projection): after OpenRLHF's batching and replay buffer they share a training batch with samples that
    have positions, and the actor's unpacking gives every sample its own positions back (found by ``ray job
    submit``: the empty micro-batch's top-k fields had width 0, and the actor's step raised)."""
    plan = make_plan(models, alpha=0.5, extra="--gold.signal logit")
    gold_maker, _, strategy, student_tok = make_makers(models, teacher_group, plan, rows=ROWS + BAD_ROWS)
    rollouts, _, long_prompt = _bad_rollouts(strategy, student_tok)
    experiences = gold_maker.make_experience_batch(rollouts)
    before = _logit_inputs_by_sample(experiences, ProjectionPositions)
    assert [k for k, v in before.items() if v[0].numel() == 0] == [k for k in before if k[0] == long_prompt]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # NaiveReplayBuffer only names a device
    buffer = NaiveReplayBuffer(sample_batch_size=len(rollouts), cpu_offload=False)
    for exp in balance_experiences(experiences, plan.args):
        buffer.append(exp)
    batch = buffer.collate_fn([buffer[i] for i in range(len(buffer))])
    after = _logit_inputs_by_sample([batch], ProjectionPositions)
    assert after.keys() == before.keys() and len(after) == len(rollouts)
    for key, (columns, ids, logprobs) in after.items():
        assert torch.equal(columns, before[key][0])
        if columns.numel():
            assert torch.equal(ids, before[key][1]) and torch.equal(logprobs, before[key][2])
        else:  # nothing to read: the long prompt's samples (their micro-batch packed a top-k of width 0)
            assert ids.numel() == logprobs.numel() == before[key][1].numel() == 0


def test_unpacking_fills_in_samples_without_positions_and_refuses_disagreeing_ones():
    """Per-sample packed fields as OpenRLHF's replay buffer hands them over (a list; the position axis, last,
    padded to a common width): a sample without positions whose top-k has width 0 (its micro-batch had no
    position at all) takes the others' width; two samples with positions and different top-k widths are refused,
    naming the field."""
    prefix = LOGIT_INPUTS_PREFIX
    packed = {
        prefix + "type": [torch.tensor(LogitLossInputs.TYPE_TAG)] * 2,
        prefix + "valid": [torch.ones(2), torch.zeros(2)],
        prefix + "columns": [torch.tensor([3, 5], dtype=torch.int32), torch.zeros(2, dtype=torch.int32)],
        prefix + "teacher_topk_ids": [torch.tensor([[7, 8], [9, 10]]), torch.zeros(0, 2, dtype=torch.int64)],
        prefix + "teacher_topk_logprobs": [torch.full((2, 2), -1.0), torch.zeros(0, 2)],
    }
    inputs = unpack_logit_inputs(packed)
    assert inputs.positions.tolist() == [[0, 3], [0, 5]] and inputs.sample_index.tolist() == [0, 0]
    # [P, k]: the position axis comes first again
    assert inputs.teacher_topk_ids.tolist() == [[7, 9], [8, 10]]
    packed[prefix + "valid"][1] = torch.tensor([1.0, 0.0])
    packed[prefix + "teacher_topk_ids"][1] = torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="teacher_topk_ids: samples disagree"):
        unpack_logit_inputs(packed)


@pytest.mark.parametrize("source", ["reference_or_teacher", "teacher"])
def test_teacher_written_off_policy_completions_replace_the_drawn_responses(models, teacher_group, source):
    """``--gold.off_policy_source``: the drawn prompts (seed 42, step 0, drawn over the batch's four distinct prompts
    in text order: the first row's, whose reference is removed, and the second's) train on the teacher group's
    completion (its own chat template, the rollout's sampling options, seeded by run and step), re-tokenised by the
    student; ``reference_or_teacher`` keeps the second prompt's reference."""
    from gold_plugin.alignment import encode_continuation
    from gold_plugin.teacher.generation import GenerationParams

    plan = make_plan(
        models,
        alpha=1.0,
        extra="--algo.advantage.estimator reinforce --gold.signal both --gold.logit_projection vocab "
        f"--gold.lmbda 0.5 --gold.off_policy_source {source} --rollout.max_new_tokens 12",
    )
    gold_maker, _, strategy, student_tok = make_makers(models, teacher_group, plan)
    gold_maker.reference_lookup.pop(next(iter(gold_maker.reference_lookup)))  # the first prompt has none
    experiences = gold_maker.make_experience_batch(make_rollouts(strategy, student_tok))
    rows = _by_row(experiences)
    inputs = _logit_inputs_by_sample(experiences)

    def total(key: str) -> float:
        return sum(float(e.info[key].sum()) for e in experiences)

    teacher_count = 2.0 if source == "reference_or_teacher" else 4.0
    assert (total("gold/off_policy"), total("gold/off_policy_teacher")) == (4.0, teacher_count)
    assert (total("gold/off_policy_reference"), total("gold/missing_reference")) == (4.0 - teacher_count, 0.0)
    assert all(float(e.info["gold/teacher_generation_seconds"][0]) > 0 for e in experiences)

    # The first prompt's completion, asked of an in-process teacher on the same weights with the same parameters.
    params = GenerationParams(
        max_new_tokens=12,
        temperature=plan.args.rollout.temperature,
        top_p=plan.args.rollout.top_p,
        seed=int(np.random.SeedSequence([42, 0, 1]).generate_state(1)[0]),
    )
    # One generate call for the step's teacher prompts in text order (sampling depends on the batch): both drawn
    # ones ("Name ..." before "What ..."), or the first row's alone.
    drawn = [ROWS[0]] if source == "reference_or_teacher" else [ROWS[1], ROWS[0]]
    written = models.local_teacher().generate(
        [[{"role": "user", "content": r["input"]}] for r in drawn], params
    )[-1]
    assert written.error is None and written.text
    expected = encode_continuation(student_tok, written.text) + (
        [student_tok.eos_token_id] if written.finished else []
    )
    off_keys = [k for k, (exp, b) in rows.items() if float(exp.info["gold/off_policy"][b]) == 1.0]
    first = [k for k in off_keys if ROWS[0]["input"] in k[0]]
    assert len(first) == 1 and list(first[0][1]) == expected[:12]  # both samples of the prompt: one key
    assert all(float(rows[k][0].info["gold/off_policy_teacher"][rows[k][1]]) == 1.0 for k in first)
    second = [k for k in off_keys if ROWS[1]["input"] in k[0]]
    assert len(second) == 1 and not any(ROWS[2]["input"] in k[0] for k in off_keys)
    if source == "reference_or_teacher":  # the dataset's answer, as with the reference source
        assert list(second[0][1]) == student_tok("croissant", add_special_tokens=False)["input_ids"] + [
            student_tok.eos_token_id
        ]
    for key in off_keys:
        exp, b = rows[key]
        mask = exp.action_mask[b].bool()
        assert torch.equal(exp.advantages[b][mask], torch.zeros(int(mask.sum())))  # no policy gradient
        assert inputs[key][0].numel() > 0  # the logit loss trains on it
        assert float(exp.info["gold/teacher_failed"][b]) == 0.0


def test_hidden_state_targets_survive_openrlhf_batching_and_replay_buffer(models, monkeypatch):
    """With the hidden-state loss (hf teacher returning sketched states), every micro-batch carries its group ends
    (action columns inside the response) and the teacher's float16 states, packed like the logit inputs; they come
    out of OpenRLHF's balancing, replay buffer and collate unchanged, and ``gold/hidden_state_groups`` counts them."""
    from gold_plugin.integrations.openrlhf.transport import prefix_of, unpack_signal
    from gold_plugin.teacher import HFTeacher

    teacher = HFTeacher(
        str(models.teacher_dir),
        device="cpu",
        tokenizer=load_packaged_tokenizer("mistral"),
        topk=4,
        hidden_state_layers=2,
        hidden_state_rank=8,
    )
    plan = make_plan(models, alpha=0.5, extra="--gold.signal logit --gold.hidden_state_coef 1")
    gold_maker, _, strategy, student_tok = make_makers(models, teacher, plan)
    experiences = gold_maker.make_experience_batch(make_rollouts(strategy, student_tok))

    prefix = prefix_of("hidden_state")

    def by_sample(batches) -> dict:
        out = {}
        for exp in batches:
            packed = {k: v for k, v in exp.info.items() if k.startswith(prefix)}
            targets = unpack_signal(gold_maker.losses["hidden_state"], packed)
            for key, (_, b) in _by_row([exp]).items():
                mine = targets.sample == b
                out[key] = (targets.action[mine], targets.teacher_states[mine])
        return out

    before = by_sample(experiences)
    assert all(
        exp.info[prefix + "teacher_states"].dtype == torch.float16 for exp in experiences
    )  # as shipped
    for key, (exp, b) in _by_row(experiences).items():
        columns, states = before[key]
        assert columns.numel() > 0 and exp.action_mask[b][columns].all()
        assert states.shape == (columns.numel(), 2, 8) and torch.isfinite(states).all()
        assert torch.equal(states, states.half().float())  # float16 on the way: exact
        assert float(exp.info["gold/hidden_state_groups"][b]) == columns.numel()
        assert (columns.diff() > 0).all()  # group ends in text order

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # NaiveReplayBuffer only names a device
    buffer = NaiveReplayBuffer(sample_batch_size=3, cpu_offload=False)
    for exp in balance_experiences(experiences, plan.args):
        buffer.append(exp)
    batch = buffer.collate_fn([buffer[i] for i in range(len(buffer))])
    after = by_sample([batch])
    assert set(after) == set(before)
    for key, (columns, states) in after.items():
        assert torch.equal(columns, before[key][0]) and torch.equal(states, before[key][1])
    assert pop_packed(batch, prefix) is not None
    assert not any(k.startswith(prefix) for k in batch.info)
