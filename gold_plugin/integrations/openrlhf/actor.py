"""The GOLD policy actor: OpenRLHF's PPO training step plus the aligned logit loss, added exactly once.

``GoldActorPPOTrainer.training_step`` pops the logit-loss inputs from ``experience.info`` (OpenRLHF would
otherwise try to log them), runs OpenRLHF's own ``training_step`` and, at its single backward, adds the term of
:func:`gold_plugin.step.logit_loss_term`: ``alpha * logit_coef * sum(L) / (action tokens of the optimiser step)``,
the reduction of OpenRLHF's token-mean policy loss, with ``L`` the per-position loss of
:func:`gold_plugin.step.compute_logit_loss` (docs/signals.md). The student's logits are read from the actor
forward that OpenRLHF's step already runs (a forward hook), so no second forward is made. Logged as
every key of :func:`gold_plugin.step.logit_metrics`: ``gold/logit_loss`` (mean per position),
``gold/logit_positions`` (positions per sample) and, with the byte projection, ``gold/projection_remainder``.
"""

from __future__ import annotations

from typing import Any

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

from .experience_maker import pop_logit_inputs, unpack_logit_inputs


class _BackwardAddsLoss:
    """Delegates to the real strategy, but adds one pending loss term to the first ``backward`` it sees."""

    def __init__(self, strategy: Any, extra_loss: Any) -> None:
        self._strategy = strategy
        self._extra_loss = extra_loss
        self.added = 0

    def backward(self, loss: torch.Tensor, model: Any, optimizer: Any, **kwargs: Any) -> Any:
        if self.added == 0:
            loss = loss + self._extra_loss()
        self.added += 1
        return self._strategy.backward(loss, model, optimizer, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)


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
        self, output: dict, experience: Any, inputs: Any, loss_batch_info: dict
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

    def training_step(
        self, experience: Any, kl_ctl: float, step: int, loss_batch_info: dict | None = None
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
        captured: dict[str, Any] = {}

        def keep_output(_module: Any, _inputs: Any, out: Any) -> None:
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


def logit_vocab(student_tokenizer: Any, gold: GoldConfig) -> LogitVocab:
    """The logit loss's vocabulary tensors, from the teacher's tokenizer (no teacher weights)."""
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    if not gold.uses_logit_loss:
        return LogitVocab()
    teacher_tokenizer = load_teacher_tokenizer(gold.teacher)
    return LogitVocab.build(student_tokenizer, teacher_tokenizer, gold)


@ray.remote(num_gpus=1)
class GoldPolicyModelActor(PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's policy actor whose trainer adds the GOLD logit loss (options from ``strategy.args.gold``)."""

    def init_model_from_pretrained(
        self, strategy: Any, pretrain: str, max_steps: int | None = None, vllm_engines=None
    ):
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        gold = gold_config_from_args(strategy.args)
        # The base class builds its ActorPPOTrainer (and the vLLM sync group) itself; extend that instance.
        self.trainer.__class__ = GoldActorPPOTrainer
        self.trainer.setup_gold(gold, logit_vocab(self.tokenizer, gold))
