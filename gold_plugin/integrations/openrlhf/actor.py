"""The GOLD policy actor: OpenRLHF's PPO training step plus the aligned logit loss, added exactly once.

``GoldActorPPOTrainer.training_step`` pops the logit-loss inputs from ``experience.info`` (OpenRLHF would
otherwise try to log them), runs OpenRLHF's own ``training_step`` and, at its single backward, adds the term of
:func:`gold_plugin.step.logit_loss_term`: ``alpha * logit_coef * sum(L) / (action tokens of the optimiser step)``,
the reduction of OpenRLHF's token-mean policy loss, with ``L`` the per-position loss of
:func:`gold_plugin.step.compute_logit_loss` (docs/signals.md). The student's logits are read from the actor
forward that OpenRLHF's step already runs (a forward hook), so no second forward is made. Logged as
every key of :func:`gold_plugin.step.logit_metrics`: ``gold/logit_loss`` (mean per position),
``gold/logit_positions`` (positions per sample) and, with the byte projection, ``gold/projection_remainder``.

Off-policy samples (``gold/off_policy``: reference completions, ``--gold.lmbda < 1``) have advantage 0, so the
policy loss ignores them; by default OpenRLHF's KL-to-reference loss and entropy term leave their tokens out too
(:func:`on_policy_kl_and_entropy`), unless ``--gold.off_policy_kl_and_entropy``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import ray
import torch
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor
from openrlhf.utils.loss_utils import get_loss_batch_info

from gold_plugin.config import GoldConfig, gold_config_from_args
from gold_plugin.step import (
    LogitVocab,
    compute_logit_loss,
    logit_inputs_class,
    logit_loss_term,
    logit_metrics,
)

from .experience_maker import OFF_POLICY_KEY, pop_logit_inputs, unpack_logit_inputs

if TYPE_CHECKING:
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.utils.deepspeed import DeepspeedStrategy
    from ray.actor import ActorHandle

    from gold_plugin.alignment.types import Tokenizer
    from gold_plugin.signals.logit import LogitLossInputs, ProjectionPositions


class _BackwardAddsLoss:
    """Delegates to the real strategy, but adds one pending loss term to the first ``backward`` it sees."""

    def __init__(self, strategy: DeepspeedStrategy, extra_loss: Callable[[], torch.Tensor]) -> None:
        self._strategy = strategy
        self._extra_loss = extra_loss
        self.added = 0

    def backward(
        self, loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any
    ) -> None:
        if self.added == 0:
            loss = loss + self._extra_loss()
        self.added += 1
        self._strategy.backward(loss, model, optimizer, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)


def off_policy_rows(experience: Experience) -> torch.Tensor | None:
    """``[B]`` bool: the micro-batch's samples marked ``gold/off_policy`` (reference completions); None when none is.

    After OpenRLHF's replay buffer the per-sample info entry is a list of 0-d tensors, before it a ``[B]`` tensor."""
    value = experience.info.get(OFF_POLICY_KEY)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        value = torch.stack([torch.as_tensor(v).reshape(()) for v in value])
    off = torch.as_tensor(value).reshape(-1) > 0
    return off if bool(off.any()) else None


@contextlib.contextmanager
def on_policy_kl_and_entropy(
    experience: Experience, off: torch.Tensor, expected_calls: int
) -> Iterator[None]:
    """Inside OpenRLHF's ``ActorPPOTrainer.training_step``, reduce the KL-to-reference loss and the entropy term
    over the on-policy samples' tokens only (the rows of ``off`` are left out).

    Both terms are ``aggregate_loss(values, experience.action_mask, **loss_batch_info)`` in that step, and nothing
    else there calls ``aggregate_loss`` with the experience's action mask (the policy loss reduces inside
    ``PolicyLoss``, in another module). For the duration of the step, the name ``aggregate_loss`` in the step's
    module is a wrapper that zeroes the off-policy rows of that mask; the normaliser (``batch_num_tokens``, all
    action tokens of the optimiser step) is unchanged, so an off-policy token contributes 0 to the sum and an
    on-policy token exactly what it contributed before. ``expected_calls`` (1 per enabled term) is checked after
    the step, so that an OpenRLHF whose step no longer reduces these terms that way fails loudly instead of
    training them on off-policy tokens."""
    namespace = ActorPPOTrainer.training_step.__globals__
    original = namespace["aggregate_loss"]
    calls = 0

    def aggregate_on_policy_tokens(
        loss: torch.Tensor, loss_mask: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        nonlocal calls
        if loss_mask is experience.action_mask:
            calls += 1
            keep = ~off.to(loss_mask.device)[:, None]
            loss_mask = torch.where(keep, loss_mask, torch.zeros_like(loss_mask))
        return original(loss, loss_mask, *args, **kwargs)

    namespace["aggregate_loss"] = aggregate_on_policy_tokens
    try:
        yield
    finally:
        namespace["aggregate_loss"] = original
    if calls != expected_calls:
        raise RuntimeError(
            f"OpenRLHF's training step reduced {calls} terms over the action mask where GOLD expected "
            f"{expected_calls} (the KL-to-reference loss and/or the entropy term): cannot leave the off-policy "
            "tokens out of them. Set --gold.off_policy_kl_and_entropy to keep them, or check the OpenRLHF version."
        )


class GoldActorPPOTrainer(ActorPPOTrainer):
    """OpenRLHF's actor trainer with the GOLD logit loss. Call :meth:`setup_gold` after construction."""

    gold: GoldConfig | None = None
    vocab: LogitVocab | None = None

    def setup_gold(self, gold_config: GoldConfig, vocab: LogitVocab) -> None:
        """Attach the GOLD options and the logit loss's vocabulary tensors (:meth:`LogitVocab.build`)."""
        vocab.check(gold_config)
        self.gold = gold_config
        self.vocab = vocab

    def _logit_loss(
        self,
        output: dict[str, torch.Tensor],
        experience: Experience,
        inputs: LogitLossInputs | ProjectionPositions,
        loss_batch_info: dict,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the term to add to the loss, the logit metrics)."""
        logits = output["logits"]
        num_actions = experience.action_mask.shape[1]
        offset = (
            logits.shape[1] - 1 - num_actions
        )  # logits[:, t] predicts token t + 1; action j is token offset+j+1
        # OpenRLHF's actor forward has divided the logits by --rollout.temperature (in place).
        temperature = float(getattr(self.actor, "temperature", 1.0))
        result = compute_logit_loss(
            logits, inputs, self.gold, self.vocab, action_offset=offset, logits_temperature=temperature
        )
        normaliser = loss_batch_info.get("batch_num_tokens")
        if normaliser is None:
            normaliser = experience.action_mask.sum()
        else:  # OpenRLHF's aggregate_loss: sum / batch_num_tokens * dp_size (dp_size undoes DDP's averaging)
            normaliser = normaliser / loss_batch_info.get("dp_size", 1)
        term = logit_loss_term(result.loss, normaliser, self.gold)
        return term, logit_metrics(result, experience.action_mask.shape[0])

    def _off_policy_terms(self, experience: Experience) -> contextlib.AbstractContextManager[None]:
        """Where the KL-to-reference loss and the entropy term leave off-policy tokens out (the default; see
        :func:`on_policy_kl_and_entropy`), the context to run OpenRLHF's step in; else a no-op."""
        gold, args = self.gold, self.args
        expected_calls = int(bool(args.algo.kl.use_loss)) + int(args.actor.entropy_coef is not None)
        if gold is None or gold.off_policy_kl_and_entropy or expected_calls == 0:
            return contextlib.nullcontext()
        off = off_policy_rows(experience)
        if off is None:
            return contextlib.nullcontext()
        return on_policy_kl_and_entropy(experience, off, expected_calls)

    def training_step(
        self, experience: Experience, kl_ctl: float, step: int, loss_batch_info: dict | None = None
    ) -> dict:
        with self._off_policy_terms(experience):
            return self._gold_training_step(experience, kl_ctl, step, loss_batch_info)

    def _gold_training_step(
        self, experience: Experience, kl_ctl: float, step: int, loss_batch_info: dict | None = None
    ) -> dict:
        packed = pop_logit_inputs(experience)
        gold = self.gold
        if gold is None or not gold.uses_logit_loss or gold.alpha == 0 or packed is None:
            return super().training_step(experience, kl_ctl, step, loss_batch_info)
        inputs = unpack_logit_inputs(packed, logit_inputs_class(gold), experience.action_mask.device)

        if loss_batch_info is None:
            loss_batch_info = get_loss_batch_info(
                self.strategy,
                experience.action_mask,
                replay_buffer=self.replay_buffer,
                step=step,
                dynamic_batch=self.args.train.dynamic_batch_enable,
            )
        captured: dict[str, dict[str, torch.Tensor]] = {}

        def keep_output(_module: torch.nn.Module, _inputs: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, tuple) and len(out) == 2 and "output" not in captured:
                captured["output"] = out[1]

        logged: dict[str, torch.Tensor] = {}

        def extra_loss() -> torch.Tensor:
            if "output" not in captured:
                raise RuntimeError(
                    "The actor forward of the training step was not seen; cannot add the logit loss."
                )
            term, metrics = self._logit_loss(captured["output"], experience, inputs, loss_batch_info)
            logged.update(metrics)
            return term

        real_strategy = self.strategy
        proxy = _BackwardAddsLoss(real_strategy, extra_loss)
        handle = self.actor.register_forward_hook(keep_output)
        self.strategy = proxy
        try:
            status = super().training_step(experience, kl_ctl, step, loss_batch_info)
        finally:
            self.strategy = real_strategy
            handle.remove()
        if proxy.added != 1:
            raise RuntimeError(
                f"The training step ran {proxy.added} backward passes; the logit loss needs one."
            )
        for key, value in logged.items():
            status["metrics"][key] = value
            status["weights"][key] = "sample"
        return status


def logit_vocab(student_tokenizer: Tokenizer, gold: GoldConfig) -> LogitVocab:
    """The logit loss's vocabulary tensors, from the teacher's tokenizer (no teacher weights)."""
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    if not gold.uses_logit_loss:
        return LogitVocab()
    teacher_tokenizer = load_teacher_tokenizer(gold.teacher)
    return LogitVocab.build(student_tokenizer, teacher_tokenizer, gold)


RNG_STATE_KEY = "gold_policy_actor_torch_rng_state"
"""The policy actor's torch RNG state in OpenRLHF's checkpoint (``client_states``)."""


@ray.remote(num_gpus=1)
class GoldPolicyModelActor(PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's policy actor whose trainer adds the GOLD logit loss (options from ``strategy.args.gold``), and
    whose checkpoint holds its torch RNG state.

    The RNG state: OpenRLHF's actor shuffles its replay buffer into micro-batches at every step with the process's
    torch RNG, seeded once at start and not saved, so a resumed job's step ``k + 1`` would group the micro-batches
    as the uninterrupted job's step 1 did (measured: the same weights up to float rounding, per-step means over
    micro-batches differing). Saved with every checkpoint and restored on load, the resumed step shuffles as the
    uninterrupted one. DeepSpeed keeps the client states of data-parallel rank 0, which every rank restores:
    exact where the ranks' RNGs move in step (the same seed and draws, as without dropout).
    """

    def init_model_from_pretrained(
        self,
        strategy: DeepspeedStrategy,
        pretrain: str,
        max_steps: int | None = None,
        vllm_engines: list[ActorHandle] | None = None,
    ) -> None:
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        self.restore_rng_state()
        gold = gold_config_from_args(strategy.args)
        # The base class builds its ActorPPOTrainer (and the vLLM sync group) itself; extend that instance.
        self.trainer.__class__ = GoldActorPPOTrainer
        self.trainer.setup_gold(gold, logit_vocab(self.tokenizer, gold))

    def save_checkpoint(self, tag: str, client_states: dict | None = None, **kwargs: Any) -> None:
        """OpenRLHF's checkpoint, its client states extended by this process's torch RNG state."""
        states = {**(client_states or {}), RNG_STATE_KEY: torch.get_rng_state()}
        super().save_checkpoint(tag, states, **kwargs)

    def restore_rng_state(self) -> bool:
        """Restore the torch RNG state from the loaded checkpoint's client states (removed from them, so the trainer
        does not log it); False when there is none (a fresh start, or a checkpoint written without it)."""
        state = (getattr(self, "checkpoint_states", None) or {}).pop(RNG_STATE_KEY, None)
        if state is None:
            return False
        torch.set_rng_state(state)
        return True
