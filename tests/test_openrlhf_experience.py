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
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.append(str(Path(__file__).parent / "stubs"))  # vllm / flash_attn import stand-ins when not installed

ray = pytest.importorskip("ray")

from openrlhf.models import Actor  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import balance_experiences  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402
from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer  # noqa: E402
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator  # noqa: E402

from gold_plugin.alignment import align, text_for_teacher  # noqa: E402
from gold_plugin.integrations.openrlhf.args import build_parser  # noqa: E402
from gold_plugin.integrations.openrlhf.experience_maker import (  # noqa: E402
    LOGIT_INPUTS_PREFIX,
    GoldExperienceMaker,
    pop_logit_inputs,
    unpack_logit_inputs,
)
from gold_plugin.integrations.openrlhf.launch_plan import resolve_launch  # noqa: E402
from gold_plugin.integrations.openrlhf.prompts import build_prompt_lookup, build_reference_lookup  # noqa: E402
from gold_plugin.signals.logit import LogitLossInputs  # noqa: E402
from gold_plugin.teacher import HFTeacher, TeacherGroup, TeacherRequest  # noqa: E402
from gold_plugin.testing.references import group_advantages_reference  # noqa: E402
from gold_plugin.testing.tiny_teacher import save_tiny_teacher  # noqa: E402
from gold_plugin.testing.tokenizers import load_test_tokenizer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # one Ray teacher actor + tiny models: ~1-2 min on 2 cores

TOPK = 4
ROWS = [
    {"input": "What is 3 + 4?", "label": "7"},
    {"input": "Name a French pastry.", "label": "croissant"},
    {"input": "Spell 'naïve' with its accent.", "label": "naïve"},
]
RESPONSES = [  # two samples per prompt; the last of each pair is cut (no EOS)
    ("3 + 4 = 7. The answer is 7.", True),
    ("It is 7, I think", False),
    ("A croissant — café au lait ☕", True),
    ("Pain au chocolat!", True),
    ("naïve: n-a-ï-v-e", True),
    ("Surely ‘naive’ works too", False),
]
REWARDS = [1.0, 0.0, 1.0, 0.5, 1.0, 0.0]


def build_models(tmp_path_factory) -> SimpleNamespace:
    """Tiny Llamas: student and reference with the Qwen tokenizer, teacher with the Mistral one."""
    student_dir = save_tiny_teacher(tmp_path_factory.mktemp("student"), "qwen", seed=1)
    teacher_dir = save_tiny_teacher(tmp_path_factory.mktemp("teacher"), "mistral", seed=2)
    ref_dir = save_tiny_teacher(tmp_path_factory.mktemp("ref"), "qwen", seed=3)
    from transformers import LlamaForCausalLM

    student = LlamaForCausalLM.from_pretrained(student_dir).eval()
    reference = LlamaForCausalLM.from_pretrained(ref_dir).eval()
    scorers = []

    def local_teacher():
        if not scorers:
            scorers.append(
                HFTeacher(str(teacher_dir), device="cpu", tokenizer=load_test_tokenizer("mistral"))
            )
        return scorers[0]

    return SimpleNamespace(
        student_dir=student_dir,
        teacher_dir=teacher_dir,
        student=student,
        reference=reference,
        local_teacher=local_teacher,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory)


@pytest.fixture(scope="module")
def teacher_group(local_ray, models):
    """A real TeacherGroup: one Ray actor running HFTeacher on CPU."""
    plan = _plan(models, alpha=0.5, extra="--gold.signal both --gold.logit_projection vocab")
    group = TeacherGroup(plan.gold, scorer_overrides={"device": "cpu"})
    yield group
    group.shutdown()


def _plan(models, alpha: float, extra: str = "", estimator: str = "group_norm"):
    argv = (
        f"--actor.model_name_or_path {models.student_dir} --gold.teacher.model_name_or_path {models.teacher_dir} "
        f"--gold.teacher.num_gpus_per_replica 0 --gold.teacher.topk {TOPK} --gold.teacher.micro_batch_size 4 "
        f"--data.prompt_dataset unused.jsonl --data.apply_chat_template --data.label_key label "
        f"--data.output_key label "
        f"--algo.advantage.estimator {estimator} --rollout.n_samples_per_prompt 2 --rollout.batch_size 3 "
        f"--rollout.micro_batch_size 2 --actor.num_nodes 1 --actor.num_gpus_per_node 2 --vllm.num_engines 1 "
        f"--algo.kl.init_coef 0.05 --algo.kl.use_loss --gold.alpha {alpha} --gold.kl_coef 2.0 "
        f"--gold.kl_discount 0.5 --reward.remote_url /unused/reward.py {extra}"
    ).split()
    return resolve_launch(build_parser().parse_args(argv))


class LocalModelGroup:
    """In-process stand-in for an OpenRLHF ``RayActorGroup`` whose DeepSpeed actors need CUDA.

    ``async_run_method_batch("forward", sequences=[...], ...)`` runs ``forward`` on every micro-batch here and
    returns a Ray object ref of the results, exactly the shape OpenRLHF's group returns (one chunk, one actor).
    """

    def __init__(self, forward):
        self.forward = forward
        self.calls = 0

    def async_run_method_batch(self, method_name, **kwargs):
        assert method_name == "forward"
        self.calls += 1
        count = len(next(iter(kwargs.values())))
        results = [self.forward(**{k: v[i] for k, v in kwargs.items()}) for i in range(count)]
        return [ray.put(results)]

    def async_run_method(self, method_name, *args, **kwargs):
        return []


def _log_prob_group(model, temperature: float = 1.0):
    actor = Actor(model, temperature=temperature)  # OpenRLHF's actor workers use --rollout.temperature
    actor.packing_samples = False  # set by Actor.__init__ only when it loads the model itself

    def forward(sequences, action_mask, attention_mask, mm_train_inputs_list=None):
        with torch.no_grad():
            return actor(sequences, action_mask, attention_mask)

    return LocalModelGroup(forward)


class RefusingRewardGroup(LocalModelGroup):
    def __init__(self):
        super().__init__(None)

    def async_run_method_batch(self, method_name, **kwargs):
        raise AssertionError("a reward model was asked for a reward")


def _critic_group():
    def forward(sequences, action_mask, attention_mask, **_):
        return torch.linspace(-0.5, 0.5, action_mask.numel()).reshape(action_mask.shape) * action_mask

    return LocalModelGroup(forward)


def _rollouts(strategy, student_tok, rewards=REWARDS, unknown_prompt: bool = True) -> list:
    """Experiences built by OpenRLHF's own samples generator from vLLM-shaped responses.

    ``unknown_prompt``: sample 4's prompt is one the prompt lookup does not know (the teacher then falls back to
    the student's prompt text).
    """
    generator = SamplesGenerator(strategy, None, None, student_tok, vllm_engines=[])
    samples = []
    for index, ((text, ends), reward) in enumerate(zip(RESPONSES, rewards)):
        row = ROWS[index // 2]
        prompt = student_tok.apply_chat_template(
            [{"role": "user", "content": row["input"]}], tokenize=False, add_generation_prompt=True
        )
        if index == 4 and unknown_prompt:
            prompt = prompt.replace("Spell", "Please spell")
        prompt_ids = student_tok(prompt, add_special_tokens=False)["input_ids"]
        response_ids = student_tok(text, add_special_tokens=False)["input_ids"]
        if ends:
            response_ids = response_ids + [student_tok.convert_tokens_to_ids("<|im_end|>")]
        response = {
            "prompt": prompt,
            "label": row["label"],
            "observation_tokens": prompt_ids + response_ids,
            "action_ranges": [(len(prompt_ids), len(prompt_ids) + len(response_ids))],
            "rollout_log_probs": None,
            "reward": reward,
            "scores": reward,
            "truncated": not ends,
        }
        samples.append(generator._process_response_into_experience(response, max_len=512))
    return samples


def _makers(models, teacher, plan, critic=False, rows=ROWS):
    student_tok = load_test_tokenizer("qwen")
    strategy = SimpleNamespace(args=plan.args)
    groups = dict(
        actor_model_group=_log_prob_group(models.student, plan.args.rollout.temperature),
        critic_model_group=_critic_group() if critic else None,
        reward_model_group=RefusingRewardGroup(),
        initial_model_group=_log_prob_group(models.reference, plan.args.rollout.temperature),
        kl_controller=FixedKLController(plan.args.algo.kl.init_coef),
        strategy=strategy,
        tokenizer=student_tok,
    )
    lookup = build_prompt_lookup(rows, student_tok, plan.args.data)
    references = build_reference_lookup(rows, student_tok, plan.args.data, plan.args.data.output_key)
    gold = GoldExperienceMaker(
        **groups,
        teacher=teacher,
        gold_config=plan.gold,
        teacher_tokenizer=load_test_tokenizer("mistral"),
        prompt_lookup=lookup,
        reference_lookup=references,
    )
    base = RemoteExperienceMaker(**groups)
    return gold, base, strategy, student_tok


def _by_row(experiences):
    """{(prompt, response token tuple): (experience, row)} over a list of micro-batch experiences."""
    out = {}
    for exp in experiences:
        for b in range(exp.sequences.shape[0]):
            mask = exp.action_mask[b].bool()
            out[(exp.prompts[b], tuple(exp.sequences[b, 1:][mask].tolist()))] = (exp, b)
    return out


def _independent_distill_advantages(models, plan, key, exp, b):
    """Per-sample distillation advantages from the public per-sample functions, computed from scratch."""
    student_tok, teacher_tok = load_test_tokenizer("qwen"), load_test_tokenizer("mistral")
    prompt, response_ids = key
    response_ids = np.asarray(response_ids)
    ends = response_ids.size and int(response_ids[-1]) == student_tok.convert_tokens_to_ids("<|im_end|>")
    raw = next(
        (
            r["input"]
            for r in ROWS
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
    plan = _plan(models, alpha=0.5, extra=f"--gold.advantage_norm {norm} --gold.signal advantage")
    gold_maker, base_maker, strategy, student_tok = _makers(models, teacher_group, plan)
    rollouts = _rollouts(strategy, student_tok)
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
    plan = _plan(
        models,
        alpha=1.0,
        extra="--algo.advantage.estimator reinforce --gold.advantage_norm none --gold.signal advantage",
    )
    assert plan.args.reward.remote_url is None
    gold_maker, _, strategy, student_tok = _makers(models, teacher_group, plan)
    nan_rewards = [float("nan")] * len(RESPONSES)
    rollouts = _rollouts(strategy, student_tok, rewards=nan_rewards)
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
    plan = _plan(models, alpha=0.0, estimator=estimator)
    gold_maker, base_maker, strategy, student_tok = _makers(
        models, teacher_group, plan, critic=estimator == "gae"
    )
    rollouts = _rollouts(strategy, student_tok)
    gold_exps = gold_maker.make_experience_batch(copy.deepcopy(rollouts))
    base_exps = base_maker.make_experience_batch(copy.deepcopy(rollouts))
    for gold_exp, base_exp in zip(gold_exps, base_exps):
        assert torch.equal(gold_exp.sequences, base_exp.sequences)
        assert torch.equal(gold_exp.advantages, base_exp.advantages)
        assert torch.equal(gold_exp.returns, base_exp.returns)
    assert any(exp.advantages.abs().sum() > 0 for exp in gold_exps)


def _logit_inputs_by_sample(experiences) -> dict:
    """{(prompt, response ids): (action columns, teacher top-k ids, log-probs)} of the packed logit inputs."""
    out = {}
    for exp in experiences:
        packed = {k: v for k, v in exp.info.items() if k.startswith(LOGIT_INPUTS_PREFIX)}
        inputs = unpack_logit_inputs(packed, LogitLossInputs)
        for key, (_, b) in _by_row([exp]).items():
            mine = inputs.sample_index == b
            out[key] = (
                inputs.positions[mine, 1],
                inputs.teacher_topk_ids[mine],
                inputs.teacher_topk_logprobs[mine],
            )
    return out


def test_logit_inputs_survive_openrlhf_batching_and_replay_buffer(models, teacher_group, monkeypatch):
    plan = _plan(models, alpha=0.5, extra="--gold.signal both --gold.logit_projection vocab")
    gold_maker, _, strategy, student_tok = _makers(models, teacher_group, plan)
    experiences = gold_maker.make_experience_batch(_rollouts(strategy, student_tok))
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
    assert pop_logit_inputs(batch) is not None
    assert not any(k.startswith(LOGIT_INPUTS_PREFIX) for k in batch.info)
    # What remains in info is what OpenRLHF's training step turns into logged metrics.
    for key, value in batch.info.items():
        assert torch.tensor(value, dtype=torch.float).shape == (len(RESPONSES),), key


def test_lmbda_replaces_a_share_of_the_prompts_by_their_reference_completion(models, teacher_group):
    plan = _plan(
        models,
        alpha=1.0,
        extra="--algo.advantage.estimator reinforce --gold.signal both --gold.logit_projection vocab --gold.lmbda 0.5",
    )
    gold_maker, _, strategy, student_tok = _makers(models, teacher_group, plan)
    gold_maker.reference_lookup.pop(next(iter(gold_maker.reference_lookup)))  # the first prompt has none
    experiences = gold_maker.make_experience_batch(_rollouts(strategy, student_tok))
    rows = _by_row(experiences)
    eos = student_tok.eos_token_id
    off_keys = [k for k, (exp, b) in rows.items() if float(exp.info["gold/off_policy"][b]) == 1.0]
    inputs = _logit_inputs_by_sample(experiences)
    for exp in experiences:
        assert torch.equal(
            exp.info["gold/on_policy"] + exp.info["gold/off_policy"], torch.ones(len(exp.prompts))
        )
        assert (exp.info["gold/off_policy"][exp.info["gold/missing_reference"] > 0] == 0).all()
    # 4 distinct prompts (sample 4's prompt was changed), round(0.5 * 4) = 2 drawn: with seed 42 at step 0 the
    # first (whose reference was removed: trained on-policy, counted) and the last (one sample, off-policy).
    off = sum(float(e.info["gold/off_policy"].sum()) for e in experiences)
    missing = sum(float(e.info["gold/missing_reference"].sum()) for e in experiences)
    assert (off, missing) == (1.0, 2.0)
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


def test_teacher_scoring_is_in_flight_while_the_model_forwards_run(models, teacher_group):
    import threading

    plan = _plan(models, alpha=0.5)
    gold_maker, _, strategy, student_tok = _makers(models, teacher_group, plan)
    started, overlapped = threading.Event(), []

    class SignallingTeacher:
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
    experiences = gold_maker.make_experience_batch(_rollouts(strategy, student_tok))
    assert overlapped and all(overlapped)
    assert all(exp.info["gold/unaligned"].sum() == 0 for exp in experiences)
