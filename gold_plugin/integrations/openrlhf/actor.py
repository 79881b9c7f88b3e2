"""The GOLD policy actor: OpenRLHF's PPO training step plus the aligned logit loss, added exactly once.

``GoldActorPPOTrainer.training_step`` pops the logit-loss inputs from ``experience.info`` (OpenRLHF would
otherwise try to log them), runs OpenRLHF's own ``training_step`` and, at its single backward, adds the term of
:func:`gold_plugin.step.logit_loss_term`: ``alpha * logit_coef * sum(L) / (action tokens of the optimiser step)``,
the reduction of OpenRLHF's token-mean policy loss, with ``L`` the per-position loss of
:func:`gold_plugin.step.compute_logit_loss` (docs/signals.md). The student's logits are read from the actor
forward that OpenRLHF's step already runs (a forward hook), so no second forward is made. Logged:
``gold/logit_loss`` (mean per position), ``gold/logit_positions`` (positions per sample) and, with the byte
projection, ``gold/projection_remainder``; the means are taken over the whole step (every micro-batch and rank:
:func:`gold_plugin.step.per_unit_means`).

With the hidden-state loss (docs/signals.md, "Hidden states") the same backward also gets
:meth:`gold_plugin.step.hidden_states.HiddenStateSignal.term`, from the student's states at the paired layers read
off the same forward (:func:`student_hidden_states`), normalised by the optimiser step's group count
(:func:`optimiser_step_groups`); the bridge is fitted in :meth:`GoldActorPPOTrainer.ppo_train` before the first
update (and before every update with ``--gold.hidden_state_bridge refit``), from statistics summed over the
data-parallel ranks, and kept in the actor's checkpoint.

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
import torch.distributed as dist
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor
from openrlhf.utils.loss_utils import _get_dp_group, get_loss_batch_info

from gold_plugin.config import GoldConfig, gold_config_from_args
from gold_plugin.step import (
    LogitVocab,
    compute_logit_loss,
    logit_loss_term,
    logit_metrics,
    per_unit_means,
)
from gold_plugin.step.hidden_states import HiddenStateSignal, HiddenStateTargets

from .compat import BackwardAddsLoss, rebound, require_compatible
from .transport import (
    HIDDEN_TARGETS_PREFIX,
    OFF_POLICY_KEY,
    hidden_group_count,
    pop_packed,
    unpack_hidden_targets,
    unpack_logit_inputs,
)

if TYPE_CHECKING:
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.utils.deepspeed import DeepspeedStrategy
    from ray.actor import ActorHandle

    from gold_plugin.alignment.types import Tokenizer
    from gold_plugin.signals.logit import LogitLossInputs, ProjectionPositions


@contextlib.contextmanager
def _removing(handle: torch.utils.hooks.RemovableHandle) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()


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
    original = ActorPPOTrainer.training_step.__globals__["aggregate_loss"]
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

    with rebound(ActorPPOTrainer.training_step, "aggregate_loss", aggregate_on_policy_tokens):
        yield
    if calls != expected_calls:
        raise RuntimeError(
            f"OpenRLHF's training step reduced {calls} terms over the action mask where GOLD expected "
            f"{expected_calls} (the KL-to-reference loss and/or the entropy term): cannot leave the off-policy "
            "tokens out of them. Set --gold.off_policy_kl_and_entropy to keep them, or check the OpenRLHF version."
        )


BATCH_GROUPS_KEY = "gold_batch_groups"
"""In OpenRLHF's per-window ``loss_batch_info``: the optimiser step's hidden-state groups (all micro-batches and
data-parallel ranks) divided by the gradient-accumulation steps, as its ``batch_num_tokens`` is."""


def dp_sum(strategy: Any, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sums`` summed over the data-parallel ranks (OpenRLHF's data-parallel group; in place); as given without
    a process group."""
    if dist.is_available() and dist.is_initialized():
        group = _get_dp_group(strategy)
        for value in sums.values():
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return sums


@contextlib.contextmanager
def optimiser_step_groups(strategy: Any) -> Iterator[None]:
    """Inside OpenRLHF's ``ActorPPOTrainer.ppo_train``, give every optimiser-step window's ``loss_batch_info`` the
    window's hidden-state group count (:data:`BATCH_GROUPS_KEY`), reduced as OpenRLHF reduces its token count.

    ``ppo_train`` pairs micro-batches with their window's normalisers through ``iter_grad_accum_global_norm``,
    which reads every micro-batch of a window (its ``mask_fn``) before it yields the first; for the duration of
    the call that name is a wrapper that counts the groups as the masks are read."""
    original = ActorPPOTrainer.ppo_train.__globals__["iter_grad_accum_global_norm"]

    def with_groups(
        data_iter: Any, strategy: Any, accumulated_gradient: int, mask_fn: Callable[[Any], torch.Tensor]
    ) -> Iterator[tuple[Any, dict]]:
        counts: list[int] = []

        def counting(item: Any) -> torch.Tensor:
            counts.append(hidden_group_count(item.info))
            return mask_fn(item)

        last = None
        for item, info in original(data_iter, strategy, accumulated_gradient, counting):
            if info is not last:
                device = info["batch_num_tokens"].device
                total = torch.tensor(float(sum(counts)), device=device)
                counts.clear()
                (total,) = dp_sum(strategy, {"groups": total}).values()
                info[BATCH_GROUPS_KEY] = total / max(int(accumulated_gradient), 1)
                last = info
            yield item, info

    with rebound(ActorPPOTrainer.ppo_train, "iter_grad_accum_global_norm", with_groups):
        yield


def transformers_model(actor: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside OpenRLHF's ``Actor`` (``actor.model``, unwrapped from a DeepSpeed engine)."""
    model = actor.model
    return getattr(model, "module", model)


@contextlib.contextmanager
def student_hidden_states(model: torch.nn.Module, layers: tuple[int, ...]) -> Iterator[list[torch.Tensor]]:
    """Within: the next forward of the transformers ``model`` also returns the states of ``layers``
    (``output_hidden_states`` numbering, 1..num_layers) and no other layer's (transformers' list form of
    ``output_hidden_states``, whose entry ``i - 1`` is state ``i`` of the boolean form); the yielded list receives
    them as one ``[B, T, L, d]`` tensor. Later forwards are left alone."""
    captured: list[torch.Tensor] = []
    request = [int(layer) - 1 for layer in layers]
    num_layers = int(model.config.num_hidden_layers)

    def ask(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if captured:
            return None
        return args, {**kwargs, "output_hidden_states": request}

    def keep(_module: torch.nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        if captured:
            return
        states = out.get("hidden_states") if hasattr(out, "get") else None
        if states is None or len(states) != num_layers or any(states[i] is None for i in request):
            raise RuntimeError(
                "The actor's transformers model did not return the asked hidden states (output_hidden_states as a "
                "list of layers, transformers >= 5): cannot compute the hidden-state loss."
            )
        captured.append(torch.stack([states[i] for i in request], dim=2))

    handles = [
        model.register_forward_pre_hook(ask, with_kwargs=True),
        model.register_forward_hook(keep, with_kwargs=True),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def states_at_targets(
    states: torch.Tensor, experience: Experience, targets: HiddenStateTargets
) -> torch.Tensor:
    """``[G, L, d]``: the student's states (``[B, T, L, d]`` over the sequences) after the targets' action tokens
    (action column j is sequence token ``T - num_actions + j``)."""
    offset = experience.sequences.shape[1] - experience.action_mask.shape[1]
    return states[targets.sample, offset + targets.action]


class GoldActorPPOTrainer(ActorPPOTrainer):
    """OpenRLHF's actor trainer with the GOLD logit loss. Call :meth:`setup_gold` after construction."""

    gold: GoldConfig | None = None
    vocab: LogitVocab | None = None
    hidden: HiddenStateSignal | None = None

    def setup_gold(self, gold_config: GoldConfig, vocab: LogitVocab) -> None:
        """Attach the GOLD options and the logit loss's vocabulary tensors (:meth:`LogitVocab.build`); with the
        hidden-state loss, its signal (the student's layers; the bridge, fitted at the first step)."""
        vocab.check(gold_config)
        self.gold = gold_config
        self.vocab = vocab.to(next(self.actor.parameters()).device)
        self.hidden = None
        if gold_config.uses_hidden_states:
            model = transformers_model(self.actor)
            self.hidden = HiddenStateSignal(gold_config, int(model.config.num_hidden_layers))

    def ppo_train(self, kl_ctl: float) -> dict:
        """OpenRLHF's ``ppo_train``, its GOLD means per position or group taken over the whole step
        (:func:`per_unit_means`: the same on any number of ranks and micro-batches); with the hidden-state loss, the
        bridge fitted first (before the first update, or every update to refit: :meth:`fit_hidden_bridge`) and every
        optimiser step's group count given to its micro-batches."""
        if self.hidden is None:
            return per_unit_means(super().ppo_train(kl_ctl))
        fitted = self.fit_hidden_bridge()
        with optimiser_step_groups(self.strategy):
            status = super().ppo_train(kl_ctl)
        return {**per_unit_means(status), **fitted}

    def fit_hidden_bridge(self) -> dict[str, float]:
        """Fit the hidden-state bridge on the replay buffer (this step's samples of this rank), the statistics
        summed over the data-parallel ranks so that every rank gets the same bridge; its metrics. Nothing (``{}``)
        when there is no hidden-state loss or the bridge is fitted and frozen (``--gold.hidden_state_bridge frozen``:
        fitted at an earlier step, or restored from a checkpoint)."""
        if self.hidden is None or not self.hidden.needs_fit:
            return {}
        buffer = self.replay_buffer
        size = max(int(buffer.sample_batch_size), 1)
        device = next(self.actor.parameters()).device
        model = transformers_model(self.actor)
        states, teacher = [], []
        with torch.no_grad():
            for start in range(0, len(buffer), size):
                batch = buffer.collate_fn([buffer[i] for i in range(start, min(start + size, len(buffer)))])
                packed = {k: v for k, v in batch.info.items() if k.startswith(HIDDEN_TARGETS_PREFIX)}
                targets = unpack_hidden_targets(packed, device)
                sequences, attention_mask = batch.sequences.to(device), batch.attention_mask.to(device)
                action_mask = batch.action_mask.to(device)
                with student_hidden_states(model, self.hidden.layers) as captured:
                    self.actor(sequences, action_mask, attention_mask)
                states.append(states_at_targets(captured[0], batch, targets))
                teacher.append(targets.teacher_states)
        if not states:
            raise RuntimeError("The replay buffer is empty: no group ends to fit the hidden-state bridge on.")
        return self.hidden.fit(
            torch.cat(states), torch.cat(teacher), lambda sums: dp_sum(self.strategy, sums)
        )

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
        batch_groups = None
        if loss_batch_info is not None and BATCH_GROUPS_KEY in loss_batch_info:
            # the window's dict (shared by its micro-batches) is left as it is; OpenRLHF gets its own keys only
            batch_groups = loss_batch_info[BATCH_GROUPS_KEY]
            loss_batch_info = {k: v for k, v in loss_batch_info.items() if k != BATCH_GROUPS_KEY}
        with self._off_policy_terms(experience):
            return self._gold_training_step(experience, kl_ctl, step, loss_batch_info, batch_groups)

    def _gold_training_step(
        self,
        experience: Experience,
        kl_ctl: float,
        step: int,
        loss_batch_info: dict | None = None,
        batch_groups: torch.Tensor | None = None,
    ) -> dict:
        packed = pop_packed(experience)
        packed_hidden = pop_packed(experience, HIDDEN_TARGETS_PREFIX)
        gold = self.gold
        logit_on = gold is not None and gold.uses_logit_loss and gold.alpha > 0 and packed is not None
        hidden_on = (
            gold is not None and self.hidden is not None and gold.alpha > 0 and packed_hidden is not None
        )
        if not (logit_on or hidden_on):
            return super().training_step(experience, kl_ctl, step, loss_batch_info)
        device = experience.action_mask.device
        inputs = unpack_logit_inputs(packed, device) if logit_on else None
        targets = unpack_hidden_targets(packed_hidden, device) if hidden_on else None

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

        logged: dict[str, torch.Tensor | float] = {}

        def extra_loss() -> torch.Tensor:
            term = torch.zeros((), device=device)
            if inputs is not None:
                if "output" not in captured:
                    raise RuntimeError(
                        "The actor forward of the training step was not seen; cannot add the logit loss."
                    )
                logit_term, metrics = self._logit_loss(
                    captured["output"], experience, inputs, loss_batch_info
                )
                term = term + logit_term
                logged.update(metrics)
            if targets is not None:
                if not states:
                    raise RuntimeError(
                        "The actor forward of the training step was not seen; cannot add the hidden-state loss."
                    )
                hidden_term, metrics = self._hidden_loss(
                    states[0], experience, targets, loss_batch_info, batch_groups
                )
                term = term + hidden_term
                logged.update(metrics)
            return term

        real_strategy = self.strategy
        proxy = BackwardAddsLoss(real_strategy, extra_loss)
        states: list[torch.Tensor] = []
        with contextlib.ExitStack() as stack:
            if targets is not None:
                assert self.hidden is not None
                model = transformers_model(self.actor)
                states = stack.enter_context(student_hidden_states(model, self.hidden.layers))
            stack.enter_context(_removing(self.actor.register_forward_hook(keep_output)))
            self.strategy = proxy
            try:
                status = super().training_step(experience, kl_ctl, step, loss_batch_info)
            finally:
                self.strategy = real_strategy
        if proxy.added != 1:
            raise RuntimeError(
                f"The training step ran {proxy.added} backward passes; the GOLD loss terms need one."
            )
        for key, value in logged.items():
            status["metrics"][key] = value
            status["weights"][key] = "sample"
        return status

    def _hidden_loss(
        self,
        states: torch.Tensor,
        experience: Experience,
        targets: HiddenStateTargets,
        loss_batch_info: dict,
        batch_groups: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(the hidden-state term to add to the loss, its metric): :meth:`HiddenStateSignal.term` with the optimiser
        step's group count (``batch_groups``, from :func:`optimiser_step_groups`), divided by the data-parallel size
        as the logit loss's token count is (DeepSpeed averages the ranks' gradients)."""
        assert self.hidden is not None
        if not self.hidden.fitted:
            raise RuntimeError(
                "The hidden-state bridge is not fitted: ppo_train fits it before the first update (fit_hidden_bridge)."
            )
        if batch_groups is None:  # a micro-batch outside ppo_train's windows: its own groups, over the ranks
            count = torch.tensor(float(targets.num_groups), device=experience.action_mask.device)
            (batch_groups,) = dp_sum(self.strategy, {"groups": count}).values()
        normaliser = float(batch_groups) / float(loss_batch_info.get("dp_size", 1))
        at_targets = states_at_targets(states, experience, targets)
        return self.hidden.term(at_targets, targets, normaliser, experience.action_mask.shape[0])


def logit_vocab(student_tokenizer: Tokenizer, gold: GoldConfig) -> LogitVocab:
    """The logit loss's vocabulary tensors, from the teacher's tokenizer (no teacher weights)."""
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    if not gold.uses_logit_loss:
        return LogitVocab()
    teacher_tokenizer = load_teacher_tokenizer(gold.teacher)
    return LogitVocab.build(student_tokenizer, teacher_tokenizer, gold)


RNG_STATE_KEY = "gold_policy_actor_torch_rng_state"
"""The policy actor's torch RNG state in OpenRLHF's checkpoint (``client_states``)."""
HIDDEN_BRIDGE_KEY = "gold_hidden_state_bridge"
"""The fitted hidden-state bridge (:meth:`HiddenStateSignal.state_dict`, CPU tensors) in OpenRLHF's checkpoint."""


@ray.remote(num_gpus=1)
class GoldPolicyModelActor(PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's policy actor whose trainer adds the GOLD logit loss (options from ``strategy.args.gold``), and
    whose checkpoint holds its torch RNG state and the fitted hidden-state bridge.

    The RNG state: OpenRLHF's actor shuffles its replay buffer into micro-batches at every step with the process's
    torch RNG, seeded once at start and not saved, so a resumed job's step ``k + 1`` would group the micro-batches
    as the uninterrupted job's step 1 did (measured: the same weights up to float rounding, per-step means over
    micro-batches differing). Saved with every checkpoint and restored on load, the resumed step shuffles as the
    uninterrupted one. DeepSpeed keeps the client states of data-parallel rank 0, which every rank restores:
    exact where the ranks' RNGs move in step (the same seed and draws, as without dropout).

    The bridge (with the hidden-state loss): fitted at the first step (every step to refit), the same on every rank,
    saved with every checkpoint and restored on load, so a resumed job keeps a frozen bridge instead of fitting a new
    one on its first step.
    """

    def init_model_from_pretrained(
        self,
        strategy: DeepspeedStrategy,
        pretrain: str,
        max_steps: int | None = None,
        vllm_engines: list[ActorHandle] | None = None,
    ) -> None:
        require_compatible()
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        self.restore_rng_state()
        gold = gold_config_from_args(strategy.args)
        # The base class builds its ActorPPOTrainer (and the vLLM sync group) itself; extend that instance.
        self.trainer.__class__ = GoldActorPPOTrainer
        self.trainer.setup_gold(gold, logit_vocab(self.tokenizer, gold))
        self.restore_hidden_bridge()

    def save_checkpoint(self, tag: str, client_states: dict | None = None, **kwargs: Any) -> None:
        """OpenRLHF's checkpoint, its client states extended by this process's torch RNG state and the fitted
        hidden-state bridge (when there is one)."""
        states = {**(client_states or {}), RNG_STATE_KEY: torch.get_rng_state()}
        hidden = getattr(getattr(self, "trainer", None), "hidden", None)
        if hidden is not None and hidden.fitted:
            states[HIDDEN_BRIDGE_KEY] = hidden.state_dict()
        super().save_checkpoint(tag, states, **kwargs)

    def restore_hidden_bridge(self) -> bool:
        """Load the fitted hidden-state bridge from the loaded checkpoint's client states into the trainer (removed
        from them, so the trainer does not log it): its first step then keeps it. False when there is none."""
        state = (getattr(self, "checkpoint_states", None) or {}).pop(HIDDEN_BRIDGE_KEY, None)
        hidden = getattr(getattr(self, "trainer", None), "hidden", None)
        if state is None or hidden is None:
            return False
        hidden.load_state_dict(state, next(self.trainer.actor.parameters()).device)
        return True

    def restore_rng_state(self) -> bool:
        """Restore the torch RNG state from the loaded checkpoint's client states (removed from them, so the trainer
        does not log it); False when there is none (a fresh start, or a checkpoint written without it)."""
        state = (getattr(self, "checkpoint_states", None) or {}).pop(RNG_STATE_KEY, None)
        if state is None:
            return False
        torch.set_rng_state(state)
        return True
