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
from gold_plugin.integrations.openrlhf.launch_plan import resolve_launch  # noqa: E402
from gold_plugin.integrations.openrlhf.transport import (  # noqa: E402
    LOGIT_INPUTS_PREFIX,
    pack_logit_inputs,
)
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer  # noqa: E402
from gold_plugin.signals.logit import LogitLossInputs, LogitLossOptions  # noqa: E402
from gold_plugin.testing.references import aligned_logit_loss_reference  # noqa: E402
from gold_plugin.testing.tiny_teacher import save_tiny_teacher  # noqa: E402

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
    student_tok, teacher_tok = load_packaged_tokenizer("qwen"), load_packaged_tokenizer("mistral")
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
    torch.testing.assert_close(  # a sum per sample (the step's mean per position: per_unit_means)
        metrics["gold/logit_loss/sum_per_sample"],
        expected_per_position.detach().sum() / 2,
        atol=1e-5,
        rtol=1e-4,
    )
    assert float(metrics["gold/logit_positions"]) == 2.0  # 4 positions in 2 samples
    assert (
        "gold/projection_remainder/sum_per_sample" not in metrics
    )  # the vocabulary-map loss has no remainder
    assert "gold/sampled_kl" in metrics and "gold/logit_loss/sum_per_sample" not in plain_status["metrics"]


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


# ── off-policy tokens and OpenRLHF's KL-to-reference and entropy terms ──

KL_COEF, ENTROPY_COEF = 0.1, 0.01
OFF_ROW = 1  # of three samples, the middle one is a reference completion


def _mixed_plan(setup, signal: str, keep: bool):
    logit_coef = f"--gold.logit_coef {LOGIT_COEF} " if signal != "advantage" else ""
    argv = (
        f"--actor.model_name_or_path {setup.student_dir} --gold.teacher.model_name_or_path /nonexistent/teacher "
        "--data.prompt_dataset unused.jsonl --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 2 "
        f"--vllm.num_engines 1 --actor.num_gpus_per_node 1 --reward.remote_url /unused/reward_func.py "
        f"--gold.alpha {ALPHA} {logit_coef}--gold.signal {signal} --gold.teacher.topk {TOPK} "
        "--gold.logit_projection vocab --gold.lmbda 0.5 --data.output_key label "
        f"--algo.kl.init_coef {KL_COEF} --algo.kl.use_loss --algo.kl.estimator k3 --actor.entropy_coef {ENTROPY_COEF} "
        f"--gold.off_policy_kl_and_entropy {str(keep).lower()}"
    ).split()
    plan = resolve_launch(build_parser().parse_args(argv))
    assert plan.gold.off_policy_kl_and_entropy is keep
    return SimpleNamespace(plan=plan, student_dir=setup.student_dir, mapping=setup.mapping, tok=setup.tok)


def _mixed_experience(setup, actor) -> Experience:
    """Three right-padded samples, the middle one off-policy (``gold/off_policy`` 1, advantage 0 as the experience
    maker sets it), with reference log-probs and teacher top-k at two positions each, after OpenRLHF's replay path
    (where a per-sample info entry is a list of 0-d tensors)."""
    tok = setup.tok
    g = torch.Generator().manual_seed(1)
    rows = []
    texts = (("Add 2 and 2.", "It is 4, clearly."), ("Hi!", "Hello there, friend"), ("Why?", "Because."))
    for row, (prompt, response) in enumerate(texts):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([p_ids + r_ids])
        length = seq.shape[1]
        action_mask = torch.zeros(1, length - 1, dtype=torch.long)
        action_mask[0, len(p_ids) - 1 :] = 1
        with torch.no_grad():
            old = actor(seq, action_mask, torch.ones_like(seq))
        base = (old + 0.4 * torch.randn(old.shape, generator=g)) * action_mask  # the reference model's
        advantages = torch.randn(1, length - 1, generator=g) * action_mask * float(row != OFF_ROW)
        cols = [len(p_ids) - 1, len(p_ids)]
        inputs = LogitLossInputs(
            positions=torch.tensor([[0, c] for c in cols]),
            teacher_topk_ids=torch.randint(3, 32000, (2, TOPK), generator=g),
            teacher_topk_logprobs=torch.randn(2, TOPK, generator=g).log_softmax(-1),
            sample_index=torch.zeros(2, dtype=torch.int64),
        )
        rows.append(
            Experience(
                sequences=seq,
                attention_mask=torch.ones_like(seq),
                action_mask=action_mask,
                action_log_probs=old,
                base_action_log_probs=base,
                advantages=advantages,
                response_length=torch.tensor([len(r_ids)]),
                total_length=torch.tensor([length]),
                info={
                    **(pack_logit_inputs(inputs, 1) if setup.plan.gold.uses_logit_loss else {}),
                    "gold/off_policy": torch.tensor([float(row == OFF_ROW)]),
                },
            )
        )
    batch = Experience.concat_experiences(rows, tok.pad_token_id)
    return make_experience_batch(split_experience_batch(batch))


def _kl_and_entropy_by_hand(actor, experience) -> tuple[torch.Tensor, torch.Tensor]:
    """Per action token: the k3 KL to the reference, ``exp(b - p) - 1 + (p - b)``, and the entropy
    ``-sum_v q_v log q_v`` of the student's next-token distribution, from a plain forward of the model."""
    seqs, attn, mask = experience.sequences, experience.attention_mask, experience.action_mask
    position_ids = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 1)
    logits = actor.model(seqs, attention_mask=attn, position_ids=position_ids)["logits"].float()
    logq = logits.log_softmax(-1)[:, :-1]  # position t predicts token t + 1
    num_actions = mask.shape[1]
    logq = logq[:, -num_actions:]
    p = logq.gather(-1, seqs[:, 1:][:, -num_actions:, None]).squeeze(-1)
    b = experience.base_action_log_probs
    kl = ((b - p).exp() - 1 + (p - b)) * mask
    entropy = -(logq.exp() * logq).sum(-1) * mask
    return kl, entropy


def _pop_logit_inputs(experience) -> None:
    for key in _logit_keys(experience.info):
        experience.info.pop(key)


def test_inputs_of_a_signal_the_run_does_not_enable_are_refused(setup, monkeypatch):
    trainer, _, actor = make_trainer(_mixed_plan(setup, "advantage", False), monkeypatch, gold=True)
    experience = _mixed_experience(_mixed_plan(setup, "logit", False), actor)
    with pytest.raises(ValueError, match=r"signals \['logit'\], which this run's options do not enable"):
        trainer.training_step(experience, KL_COEF, 0)


def test_off_policy_rows_reads_both_info_layouts():
    from gold_plugin.integrations.openrlhf.actor import off_policy_rows

    listed = Experience(info={"gold/off_policy": [torch.tensor(0.0), torch.tensor(1.0)]})
    assert off_policy_rows(listed).tolist() == [False, True]
    assert off_policy_rows(Experience(info={"gold/off_policy": torch.tensor([0.0, 0.0])})) is None
    assert off_policy_rows(Experience(info={})) is None


@pytest.mark.parametrize("signal", ["advantage", "logit"])
def test_off_policy_tokens_get_no_kl_or_entropy_term_unless_the_option_says_so(setup, monkeypatch, signal):
    """OpenRLHF's training step with ``--algo.kl.use_loss`` (k3) and ``--actor.entropy_coef`` on a batch of two
    on-policy samples and one off-policy sample: by default the off-policy sample's tokens add nothing to the KL
    and entropy terms (their values and gradients are those of the on-policy tokens alone, over all action tokens
    of the step); with ``--gold.off_policy_kl_and_entropy true`` they add what OpenRLHF's plain step adds."""
    runs = {}
    for name, keep in (("default", False), ("keep", True)):
        mixed = _mixed_plan(setup, signal, keep)
        trainer, strategy, actor = make_trainer(mixed, monkeypatch, gold=True)
        experience = _mixed_experience(mixed, actor)
        status = trainer.training_step(experience, KL_COEF, 0)
        runs[name] = (strategy.losses, _grads(actor), status["metrics"], experience, actor)
    plain, plain_strategy, plain_actor = make_trainer(
        _mixed_plan(setup, signal, True), monkeypatch, gold=False
    )
    experience = _mixed_experience(setup, plain_actor)
    _pop_logit_inputs(experience)
    plain_metrics = plain.training_step(experience, KL_COEF, 0)["metrics"]
    plain_grads = _grads(plain_actor)

    actor = runs["default"][4]
    actor.zero_grad()
    kl, entropy = _kl_and_entropy_by_hand(actor, experience)
    n = experience.action_mask.sum()
    off = torch.zeros_like(kl, dtype=torch.bool)
    off[OFF_ROW] = True
    assert kl[OFF_ROW].abs().sum() > 1e-3 and entropy[OFF_ROW].sum() > 1.0  # the left-out tokens are not 0
    on_kl, on_entropy = kl[~off].sum() / n, entropy[~off].sum() / n
    all_kl, all_entropy = kl.sum() / n, entropy.sum() / n

    default_losses, default_grads, default_metrics, *_ = runs["default"]
    keep_losses, keep_grads, keep_metrics, *_ = runs["keep"]
    close = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(default_metrics["kl"], on_kl.detach(), **close)
    torch.testing.assert_close(default_metrics["entropy_loss"], on_entropy.detach(), **close)
    torch.testing.assert_close(keep_metrics["kl"], all_kl.detach(), **close)
    torch.testing.assert_close(keep_metrics["entropy_loss"], all_entropy.detach(), **close)
    torch.testing.assert_close(plain_metrics["kl"], all_kl.detach(), **close)
    for metrics in (default_metrics, keep_metrics):  # the policy loss is untouched
        torch.testing.assert_close(metrics["policy_loss"], plain_metrics["policy_loss"], atol=0, rtol=0)

    # The loss the backward saw differs by exactly the off-policy tokens' terms, and so do the gradients.
    left_out = KL_COEF * (kl[off].sum() / n) - ENTROPY_COEF * (entropy[off].sum() / n)
    assert len(default_losses) == len(keep_losses) == 1
    torch.testing.assert_close(keep_losses[0] - default_losses[0], left_out.detach(), **close)
    left_out.backward()
    expected = _grads(actor)
    assert expected["model.lm_head.weight"].abs().sum() > 0
    for name, grad in expected.items():
        torch.testing.assert_close(keep_grads[name] - default_grads[name], grad, atol=1e-6, rtol=1e-3)
    if signal == "advantage":  # no logit loss: the option's run is OpenRLHF's plain step
        torch.testing.assert_close(keep_losses[0], plain_strategy.losses[0], atol=1e-6, rtol=0)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(keep_grads[name], grad, atol=1e-7, rtol=1e-5)


def test_the_policy_actors_checkpoint_holds_its_rng_state_for_the_replay_buffer_shuffle(monkeypatch):
    """Saved with OpenRLHF's client states and restored on load: a resumed actor shuffles its replay buffer (OpenRLHF's
    ``DataLoader(..., shuffle=True)``) at the next steps as the uninterrupted actor does, not as at its first step."""
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    from torch.utils.data import DataLoader

    from gold_plugin.integrations.openrlhf.actor import RNG_STATE_KEY, GoldPolicyModelActor

    saved = {}

    def base_save(self, tag, client_states=None, metric_value=None, metric_key=None):
        saved.update(tag=tag, states=client_states, metric_key=metric_key)

    monkeypatch.setattr(PolicyModelActor.__ray_actor_class__, "save_checkpoint", base_save)
    actor_class = GoldPolicyModelActor.__ray_actor_class__

    def shuffles(steps: int) -> list[list[int]]:
        return [
            [int(i) for batch in DataLoader(range(8), batch_size=2, shuffle=True) for i in batch]
            for _ in range(steps)
        ]

    torch.manual_seed(42)  # OpenRLHF seeds the actor once, at start
    first_steps = shuffles(2)
    actor = object.__new__(actor_class)
    actor_class.save_checkpoint(actor, "global_step2", client_states={"global_step": 2}, metric_key="k")
    uninterrupted = shuffles(2)  # steps 3 and 4

    torch.manual_seed(42)  # the resumed job's actor, seeded as at start
    resumed = object.__new__(actor_class)
    resumed.checkpoint_states = dict(saved["states"])
    assert actor_class.restore_rng_state(resumed)
    assert shuffles(2) == uninterrupted != first_steps
    assert RNG_STATE_KEY not in resumed.checkpoint_states and resumed.checkpoint_states["global_step"] == 2
    assert saved["tag"] == "global_step2" and saved["metric_key"] == "k"
    fresh = object.__new__(actor_class)
    fresh.checkpoint_states = {}
    assert not actor_class.restore_rng_state(fresh)


def test_the_policy_actors_checkpoint_holds_the_fitted_hidden_state_bridge(setup, monkeypatch, tmp_path):
    """Saved with OpenRLHF's client states (through torch.save, as DeepSpeed writes them) and restored on load:
    the resumed actor's bridge is the saved one, and its first step does not fit another."""
    import dataclasses

    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

    from gold_plugin.integrations.openrlhf.actor import SIGNAL_STATE_KEY, GoldPolicyModelActor

    saved = {}

    def base_save(self, tag, client_states=None, metric_value=None, metric_key=None):
        torch.save(client_states, tmp_path / "client_states.pt")
        saved.update(tag=tag)

    monkeypatch.setattr(PolicyModelActor.__ray_actor_class__, "save_checkpoint", base_save)
    actor_class = GoldPolicyModelActor.__ray_actor_class__
    gold = setup.plan.gold
    hidden_gold = dataclasses.replace(
        gold, hidden_state_coef=1.0, teacher=dataclasses.replace(gold.teacher, hidden_state_layers=2)
    )
    hidden_setup = SimpleNamespace(
        plan=SimpleNamespace(args=setup.plan.args, gold=hidden_gold),
        student_dir=setup.student_dir,
        mapping=setup.mapping,
        tok=setup.tok,
    )
    trainer, _, _ = make_trainer(hidden_setup, monkeypatch, gold=True)
    hidden = trainer.losses["hidden_state"]
    assert not hidden.fitted
    width = trainer.actor.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(20, 2, width, generator=g), torch.randn(20, 2, 4, generator=g)
    hidden.fit_states(student, teacher)

    actor = object.__new__(actor_class)
    actor.trainer = trainer
    actor_class.save_checkpoint(actor, "global_step1", client_states={"global_step": 1})
    states = torch.load(tmp_path / "client_states.pt", weights_only=False)
    assert (
        saved["tag"] == "global_step1"
        and SIGNAL_STATE_KEY in states
        and set(states[SIGNAL_STATE_KEY]) == {"hidden_state"}
    )

    resumed = object.__new__(actor_class)
    resumed.trainer, _, _ = make_trainer(hidden_setup, monkeypatch, gold=True)
    resumed.checkpoint_states = states
    assert actor_class.restore_signal_states(resumed)
    assert SIGNAL_STATE_KEY not in resumed.checkpoint_states and resumed.checkpoint_states["global_step"] == 1
    restored = resumed.trainer.losses["hidden_state"].state_dict()
    for key, value in hidden.state_dict().items():
        torch.testing.assert_close(restored[key], value, atol=0, rtol=0)
    # Not refitted: the first step keeps it (its replay buffer is empty here; a fit would raise).
    assert len(resumed.trainer.replay_buffer) == 0 and resumed.trainer.fit_signals() == {}
    assert resumed.trainer.losses["hidden_state"].state_dict()["student_map"].equal(restored["student_map"])

    fresh = object.__new__(actor_class)
    fresh.trainer, _, _ = make_trainer(hidden_setup, monkeypatch, gold=True)
    fresh.checkpoint_states = {}
    assert not actor_class.restore_signal_states(fresh) and not fresh.trainer.losses["hidden_state"].fitted


def test_every_optimiser_step_window_gets_its_hidden_state_group_count(process_group):
    """Inside ``ppo_train`` (:func:`optimiser_step_positions`), OpenRLHF's window iterator gives every micro-batch of
    an optimiser step the step's group count divided by the accumulation steps, as it does for its token count."""
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    from gold_plugin.integrations.openrlhf.actor import BATCH_POSITIONS_KEY, optimiser_step_positions
    from gold_plugin.integrations.openrlhf.transport import prefix_of

    def micro_batch(groups: list[int]) -> SimpleNamespace:
        width = max(groups)
        valid = [torch.arange(width).lt(g).float() for g in groups]  # per sample, as after the replay buffer
        return SimpleNamespace(
            action_mask=torch.ones(len(groups), 3), info={prefix_of("hidden_state") + "valid": valid}
        )

    batches = [micro_batch([2, 1]), micro_batch([0, 3]), micro_batch([4, 4]), micro_batch([1, 0])]
    strategy = SimpleNamespace()
    namespace = ActorPPOTrainer.ppo_train.__globals__
    original = namespace["iter_grad_accum_global_norm"]
    with optimiser_step_positions(strategy, ("hidden_state",)):
        windows = list(
            namespace["iter_grad_accum_global_norm"](iter(batches), strategy, 2, lambda e: e.action_mask)
        )
    assert namespace["iter_grad_accum_global_norm"] is original
    assert [float(info[BATCH_POSITIONS_KEY]["hidden_state"]) for _, info in windows] == [
        3.0,
        3.0,
        4.5,
        4.5,
    ]  # (3+3)/2, (8+1)/2
    assert [float(info["batch_num_tokens"]) for _, info in windows] == [6.0, 6.0, 6.0, 6.0]
