"""The GOLD policy actor: OpenRLHF's PPO training step plus the aligned logit loss, added exactly once.

``GoldActorPPOTrainer.training_step`` pops the per-token GOLD extras from ``experience.info`` (OpenRLHF would
otherwise try to log them), runs OpenRLHF's own ``training_step`` and, at its single backward, adds
``alpha * logit_coef * L`` where ``L`` is the aligned GKD/ULD loss (docs/design.md, "Aligned logit loss") at the aligned positions, summed
and normalised like OpenRLHF's token-mean policy loss (per action token over the optimiser step). The student's
logits are read from the actor forward that OpenRLHF's step already runs (a forward hook), so no second forward
is made. The loss is logged as ``gold_logit_loss`` (mean per aligned position).
"""

from __future__ import annotations

from typing import Any

import ray
import torch
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor
from openrlhf.utils.loss_utils import get_loss_batch_info

from gold_plugin.config import GoldConfig, gold_config_from_args
from gold_plugin.signals.logit_loss import aligned_logit_loss

from .experience_maker import LOGIT_MASK_KEY, PER_TOKEN_INFO_KEYS, TOPK_IDS_KEY, TOPK_LOGPROBS_KEY


def _fit_time(values: torch.Tensor, length: int, pad_value: float) -> torch.Tensor:
    """Trim or right-pad the last (time) axis to ``length``."""
    current = values.shape[-1]
    if current >= length:
        return values[..., :length]
    pad = torch.full(
        (*values.shape[:-1], length - current), pad_value, dtype=values.dtype, device=values.device
    )
    return torch.cat([values, pad], dim=-1)


def pop_gold_extras(experience: Any) -> dict[str, torch.Tensor]:
    """Remove the per-token GOLD entries from ``experience.info`` and return them batched to its action width.

    After OpenRLHF's replay buffer they arrive as a list of per-sample tensors whose time axis has the width of
    the rollout micro-batch they came from; they come back as ``[batch, ..., num_actions]`` tensors whose time
    axis matches ``experience.action_mask`` (trimmed or padded: ids -1, log-probs -inf, mask 0).
    """
    num_actions = experience.action_mask.shape[-1]
    pad_values = {TOPK_IDS_KEY: -1, TOPK_LOGPROBS_KEY: float("-inf"), LOGIT_MASK_KEY: 0.0}
    extras = {}
    for key in PER_TOKEN_INFO_KEYS:
        value = experience.info.pop(key, None)
        if value is None:
            continue
        rows = list(value) if isinstance(value, (list, tuple)) else list(value.unbind(0))
        pad = pad_values.get(key, 0.0)
        extras[key] = torch.stack([_fit_time(torch.as_tensor(r), num_actions, pad) for r in rows]).to(
            experience.action_mask.device
        )
    return extras


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
    teacher_to_student: torch.Tensor | None = None

    def setup_gold(self, gold_config: GoldConfig, teacher_to_student: torch.Tensor | None) -> None:
        """Attach the GOLD options and the teacher->student vocabulary map (int64, -1 = unmatched)."""
        if gold_config.uses_logit_loss and teacher_to_student is None and gold_config.alignment == "spans":
            raise ValueError("The logit loss needs the teacher->student vocabulary map.")
        self.gold = gold_config
        self.teacher_to_student = teacher_to_student

    def _logit_loss(
        self, output: dict, experience: Any, extras: dict[str, torch.Tensor], loss_batch_info: dict
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(scaled loss to add, per-position mean for logging, number of positions)."""
        logits = output["logits"]
        action_mask = experience.action_mask
        batch, num_actions = action_mask.shape
        offset = (
            logits.shape[1] - 1 - num_actions
        )  # logits[:, t] predicts token t + 1; action j is token offset+j+1
        mask = extras[LOGIT_MASK_KEY] > 0
        rows, cols = mask.nonzero(as_tuple=True)
        positions = torch.stack([rows, cols + offset], dim=1)
        ids = extras[TOPK_IDS_KEY].permute(0, 2, 1)[rows, cols]
        logprobs = extras[TOPK_LOGPROBS_KEY].permute(0, 2, 1)[rows, cols]
        mapping = self.teacher_to_student.to(logits.device) if self.teacher_to_student is not None else None
        result = aligned_logit_loss(logits, ids, logprobs, mapping, config=self.gold, positions=positions)
        total = result.loss.sum()
        normaliser = loss_batch_info.get("batch_num_tokens")
        dp_size = loss_batch_info.get("dp_size", 1)
        scaled = (
            total / normaliser * dp_size if normaliser is not None else total / max(int(action_mask.sum()), 1)
        )
        count = int(result.valid.sum())
        mean = result.loss.detach().sum() / max(count, 1)
        return self.gold.alpha * self.gold.logit_coef * scaled, mean, count

    def training_step(
        self, experience: Any, kl_ctl: float, step: int, loss_batch_info: dict | None = None
    ) -> dict:
        extras = pop_gold_extras(experience)
        gold = self.gold
        if gold is None or not gold.uses_logit_loss or LOGIT_MASK_KEY not in extras:
            return super().training_step(experience, kl_ctl, step, loss_batch_info)

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

        logged: dict[str, Any] = {}

        def extra_loss() -> torch.Tensor:
            if "output" not in captured:
                raise RuntimeError(
                    "The actor forward of the training step was not seen; cannot add the logit loss."
                )
            loss, mean, count = self._logit_loss(captured["output"], experience, extras, loss_batch_info)
            logged.update(mean=mean, count=count)
            return loss

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
        status["metrics"]["gold_logit_loss"] = logged["mean"]
        status["weights"]["gold_logit_loss"] = "sample"
        status["metrics"]["gold_logit_positions"] = torch.tensor(float(logged["count"]))
        status["weights"]["gold_logit_positions"] = "sample"
        return status


def teacher_to_student_map(
    student_tokenizer: Any, gold: GoldConfig, vocab_size: int | None = None
) -> torch.Tensor:
    """The teacher->student id map the logit loss needs, from the teacher's tokenizer (no teacher weights)."""
    from gold_plugin.alignment import VocabMap
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    teacher_tokenizer = load_teacher_tokenizer(gold.teacher)
    return VocabMap(student_tokenizer, teacher_tokenizer).teacher_to_student_tensor()


@ray.remote(num_gpus=1)
class GoldPolicyModelActor(PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's policy actor whose trainer adds the GOLD logit loss (options from ``strategy.args.gold``)."""

    def init_model_from_pretrained(
        self, strategy: Any, pretrain: str, max_steps: int | None = None, vllm_engines=None
    ):
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        gold = gold_config_from_args(strategy.args)
        mapping = teacher_to_student_map(self.tokenizer, gold) if gold.uses_logit_loss else None
        # The base class builds its ActorPPOTrainer (and the vLLM sync group) itself; extend that instance.
        self.trainer.__class__ = GoldActorPPOTrainer
        self.trainer.setup_gold(gold, mapping)
