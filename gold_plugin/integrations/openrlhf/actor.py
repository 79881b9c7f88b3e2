"""The GOLD policy actor: OpenRLHF's PPO training step plus the GOLD loss signals' terms, added exactly once.

``GoldActorPPOTrainer.training_step`` pops every loss signal's inputs from ``experience.info`` (OpenRLHF would
otherwise try to log them), runs OpenRLHF's own ``training_step`` and, at its single backward, adds each signal's
term (:meth:`gold_plugin.step.LossSignal.term`), read off the actor forward that OpenRLHF's step already runs: the
logits through a forward hook, the states of the layers a signal asks for through transformers' hooks
(:func:`student_hidden_states`), so no second forward is made (docs/signals.md).

- The logit loss: ``alpha * logit_coef * sum(L) / (action tokens of the optimiser step)``, the reduction of
  OpenRLHF's token-mean policy loss. Logged: ``gold/logit_loss`` (mean per position), ``gold/logit_positions``
  (positions per sample) and, with the byte projection, ``gold/projection_remainder``.
- The hidden-state loss (docs/signals.md, "Hidden states"): a mean over the optimiser step's aligned groups
  (:func:`optimiser_step_positions`); its bridge is fitted in :meth:`GoldActorPPOTrainer.ppo_train` before the first
  update (and before every update with ``--gold.hidden_state_bridge refit``), from statistics summed over the
  data-parallel ranks, and kept in the actor's checkpoint.

The means are taken over the whole step (every micro-batch and rank: :func:`gold_plugin.step.per_unit_means`).
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
from gold_plugin.signals.positions import PositionBatch
from gold_plugin.step import (
    LogitVocab,
    LossSignal,
    StudentForward,
    loss_signals,
    per_unit_means,
    student_layers,
)

from .compat import BackwardAddsLoss, rebound, require_compatible
from .transport import (
    OFF_POLICY_KEY,
    packed_signal_names,
    pop_packed,
    position_count,
    prefix_of,
    unpack_signal,
)

if TYPE_CHECKING:
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.utils.deepspeed import DeepspeedStrategy
    from ray.actor import ActorHandle

    from gold_plugin.alignment.types import Tokenizer


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


BATCH_POSITIONS_KEY = "gold_batch_positions"
"""In OpenRLHF's per-window ``loss_batch_info``: per loss signal whose unit is its positions (by name), the optimiser
step's positions (all micro-batches and data-parallel ranks) divided by the gradient-accumulation steps, as its
``batch_num_tokens`` is."""


def dp_sum(strategy: Any, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sums`` summed over the data-parallel ranks (OpenRLHF's data-parallel group; in place); as given without
    a process group."""
    if dist.is_available() and dist.is_initialized():
        group = _get_dp_group(strategy)
        for value in sums.values():
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return sums


@contextlib.contextmanager
def optimiser_step_positions(strategy: Any, names: tuple[str, ...]) -> Iterator[None]:
    """Inside OpenRLHF's ``ActorPPOTrainer.ppo_train``, give every optimiser-step window's ``loss_batch_info`` the
    window's position count of each loss signal in ``names`` (:data:`BATCH_POSITIONS_KEY`), reduced as OpenRLHF
    reduces its token count.

    ``ppo_train`` pairs micro-batches with their window's normalisers through ``iter_grad_accum_global_norm``,
    which reads every micro-batch of a window (its ``mask_fn``) before it yields the first; for the duration of
    the call that name is a wrapper that counts the positions as the masks are read."""
    original = ActorPPOTrainer.ppo_train.__globals__["iter_grad_accum_global_norm"]

    def with_positions(
        data_iter: Any, strategy: Any, accumulated_gradient: int, mask_fn: Callable[[Any], torch.Tensor]
    ) -> Iterator[tuple[Any, dict]]:
        counts: dict[str, int] = dict.fromkeys(names, 0)

        def counting(item: Any) -> torch.Tensor:
            for name in names:
                counts[name] += position_count(item.info, name)
            return mask_fn(item)

        last = None
        for item, info in original(data_iter, strategy, accumulated_gradient, counting):
            if info is not last:
                device = info["batch_num_tokens"].device
                totals = dp_sum(
                    strategy,
                    {name: torch.tensor(float(count), device=device) for name, count in counts.items()},
                )
                counts.update(dict.fromkeys(names, 0))
                steps = max(int(accumulated_gradient), 1)
                info[BATCH_POSITIONS_KEY] = {name: total / steps for name, total in totals.items()}
                last = info
            yield item, info

    with rebound(ActorPPOTrainer.ppo_train, "iter_grad_accum_global_norm", with_positions):
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


class GoldActorPPOTrainer(ActorPPOTrainer):
    """OpenRLHF's actor trainer with the GOLD loss signals' terms. Call :meth:`setup_gold` after construction."""

    gold: GoldConfig | None = None
    losses: dict[str, LossSignal] = {}
    student_layers: tuple[int, ...] = ()

    def setup_gold(self, gold_config: GoldConfig, vocab: LogitVocab) -> None:
        """Attach the GOLD options and the run's loss signals (:func:`~gold_plugin.step.loss_signals`; ``vocab`` from
        :meth:`LogitVocab.build`), on the actor's device."""
        model = transformers_model(self.actor)
        device = next(self.actor.parameters()).device
        self.gold = gold_config
        signals = loss_signals(gold_config, vocab, int(model.config.num_hidden_layers))
        self.losses = {name: signal.to(device) for name, signal in signals.items()}
        self.student_layers = student_layers(self.losses)

    def _units_in_positions(self) -> tuple[str, ...]:
        return tuple(name for name, signal in self.losses.items() if signal.unit == "positions")

    def ppo_train(self, kl_ctl: float) -> dict:
        """OpenRLHF's ``ppo_train``, its GOLD means per position or group taken over the whole step
        (:func:`per_unit_means`: the same on any number of ranks and micro-batches); the signals that need it fitted
        first (:meth:`fit_signals`), and every optimiser step's count of each signal's positions given to its
        micro-batches where a signal is a mean over its positions."""
        fitted = self.fit_signals()
        names = self._units_in_positions()
        with optimiser_step_positions(self.strategy, names) if names else contextlib.nullcontext():
            status = super().ppo_train(kl_ctl)
        return {**per_unit_means(status), **fitted}

    def fit_signals(self) -> dict[str, float]:
        """Fit the signals that need it (the hidden-state bridge: before the first update, or every update to refit)
        on the replay buffer (this step's samples of this rank), their statistics summed over the data-parallel
        ranks so that every rank fits the same; their metrics (``{}`` when none needs a fit)."""
        metrics: dict[str, float] = {}
        for signal in self.losses.values():
            if signal.needs_fit:
                forwards = self._no_grad_forwards(signal)
                metrics.update(signal.fit(forwards, lambda sums: dp_sum(self.strategy, sums)))
        return metrics

    def _no_grad_forwards(self, signal: LossSignal) -> Iterator[tuple[StudentForward, PositionBatch]]:
        """The replay buffer's micro-batches: a no-grad actor forward each, with ``signal``'s inputs."""
        buffer = self.replay_buffer
        if len(buffer) == 0:
            raise RuntimeError(f"The replay buffer is empty: nothing to fit the {signal.name} signal on.")
        size = max(int(buffer.sample_batch_size), 1)
        device = next(self.actor.parameters()).device
        prefix = prefix_of(signal.name)
        for start in range(0, len(buffer), size):
            batch = buffer.collate_fn([buffer[i] for i in range(start, min(start + size, len(buffer)))])
            packed = {k: v for k, v in batch.info.items() if k.startswith(prefix)}
            sequences, attention_mask = batch.sequences.to(device), batch.attention_mask.to(device)
            with torch.no_grad(), self._student_forward(batch) as forward:
                self.actor(sequences, batch.action_mask.to(device), attention_mask)
            yield forward(), unpack_signal(signal, packed, device)

    @contextlib.contextmanager
    def _student_forward(self, experience: Experience) -> Iterator[Callable[[], StudentForward]]:
        """Within: the next actor forward (OpenRLHF's own, in its step) is read for the loss signals: its logits
        (a forward hook on the actor) and the states of :attr:`student_layers` (transformers' hooks). Yields a
        function that returns them as a :class:`StudentForward`, once the forward ran."""
        captured: dict[str, Any] = {}

        def keep_output(_module: torch.nn.Module, _inputs: tuple[Any, ...], out: Any) -> None:
            # The step's forward asks for its output: (log-probs, output); other forwards return log-probs only.
            if "logits" not in captured and isinstance(out, tuple) and len(out) == 2:
                captured["logits"] = out[1]["logits"]

        with contextlib.ExitStack() as stack:
            states: list[torch.Tensor] = []
            if self.student_layers:
                model = transformers_model(self.actor)
                states = stack.enter_context(student_hidden_states(model, self.student_layers))
            stack.enter_context(_removing(self.actor.register_forward_hook(keep_output)))

            def forward() -> StudentForward:
                if not captured and not states:
                    raise RuntimeError("The actor forward was not seen: cannot compute the GOLD terms.")
                logits = captured.get("logits")
                num_actions = experience.action_mask.shape[1]
                length = experience.sequences.shape[1]
                return StudentForward(
                    logits=logits,
                    # logits[:, t] predicts token t + 1; action j is token T - A + j
                    logit_offset=(length if logits is None else logits.shape[1]) - 1 - num_actions,
                    # OpenRLHF's actor forward has divided the logits by --rollout.temperature (in place).
                    logits_temperature=float(getattr(self.actor, "temperature", 1.0)),
                    states=states[0] if states else None,
                    layers=self.student_layers,
                    state_offset=length - num_actions,  # the state after action j is sequence token T - A + j
                )

            yield forward

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
        batch_positions: dict[str, torch.Tensor] = {}
        if loss_batch_info is not None and BATCH_POSITIONS_KEY in loss_batch_info:
            # the window's dict (shared by its micro-batches) is left as it is; OpenRLHF gets its own keys only
            batch_positions = loss_batch_info[BATCH_POSITIONS_KEY]
            loss_batch_info = {k: v for k, v in loss_batch_info.items() if k != BATCH_POSITIONS_KEY}
        with self._off_policy_terms(experience):
            return self._gold_training_step(experience, kl_ctl, step, loss_batch_info, batch_positions)

    def _gold_training_step(
        self,
        experience: Experience,
        kl_ctl: float,
        step: int,
        loss_batch_info: dict | None,
        batch_positions: dict[str, torch.Tensor],
    ) -> dict:
        device = experience.action_mask.device
        stray = packed_signal_names(experience.info) - set(self.losses)
        if stray:
            raise ValueError(
                f"The experience carries the inputs of the loss signals {sorted(stray)}, which this run's options do "
                f"not enable (enabled: {sorted(self.losses) or 'none'}): the experience maker and the actor must run "
                "with the same --gold options."
            )
        prepared: dict[str, PositionBatch] = {}
        for name, signal in self.losses.items():
            packed = pop_packed(experience, prefix_of(name))
            if packed is not None:
                prepared[name] = unpack_signal(signal, packed, device)
        if not prepared:
            return super().training_step(experience, kl_ctl, step, loss_batch_info)
        if loss_batch_info is None:
            loss_batch_info = get_loss_batch_info(
                self.strategy,
                experience.action_mask,
                replay_buffer=self.replay_buffer,
                step=step,
                dynamic_batch=self.args.train.dynamic_batch_enable,
            )
        info = loss_batch_info
        logged: dict[str, torch.Tensor] = {}

        with self._student_forward(experience) as student:

            def extra_loss() -> torch.Tensor:
                forward = student()
                term = torch.zeros((), device=device)
                for name, batch in prepared.items():
                    signal = self.losses[name]
                    part, metrics = signal.term(
                        forward,
                        batch,
                        self._normaliser(signal, batch, experience, info, batch_positions),
                        len(experience.action_mask),
                    )
                    term = term + part
                    logged.update(metrics)
                return term

            real_strategy = self.strategy
            proxy = BackwardAddsLoss(real_strategy, extra_loss)
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

    def _normaliser(
        self,
        signal: LossSignal,
        batch: PositionBatch,
        experience: Experience,
        loss_batch_info: dict,
        batch_positions: dict[str, torch.Tensor],
    ) -> torch.Tensor | float:
        """What ``signal``'s term of this micro-batch is divided by: the optimiser step's action tokens (OpenRLHF's
        ``batch_num_tokens``) or the signal's positions (:func:`optimiser_step_positions`), divided by the
        data-parallel size as OpenRLHF's ``aggregate_loss`` divides (DeepSpeed averages the ranks' gradients)."""
        dp_size = loss_batch_info.get("dp_size", 1)
        if signal.unit == "action_tokens":
            tokens = loss_batch_info.get("batch_num_tokens")
            return experience.action_mask.sum() if tokens is None else tokens / dp_size
        count = batch_positions.get(signal.name)
        if count is None:  # a micro-batch outside ppo_train's windows: its own positions, over the ranks
            own = torch.tensor(float(batch.num_positions), device=experience.action_mask.device)
            (count,) = dp_sum(self.strategy, {signal.name: own}).values()
        return float(count) / float(dp_size)


def logit_vocab(student_tokenizer: Tokenizer, gold: GoldConfig) -> LogitVocab:
    """The logit loss's vocabulary tensors, from the teacher's tokenizer (no teacher weights)."""
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    if not gold.uses_logit_loss:
        return LogitVocab()
    teacher_tokenizer = load_teacher_tokenizer(gold.teacher)
    return LogitVocab.build(student_tokenizer, teacher_tokenizer, gold)


RNG_STATE_KEY = "gold_policy_actor_torch_rng_state"
"""The policy actor's torch RNG state in OpenRLHF's checkpoint (``client_states``)."""
SIGNAL_STATE_KEY = "gold_signal_states"
"""The loss signals' fitted states (``{name: LossSignal.state_dict()}``, CPU tensors; e.g. the hidden-state bridge)
in OpenRLHF's checkpoint."""


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
        self.restore_signal_states()

    def save_checkpoint(self, tag: str, client_states: dict | None = None, **kwargs: Any) -> None:
        """OpenRLHF's checkpoint, its client states extended by this process's torch RNG state and the loss
        signals' fitted states (those that have one)."""
        states = {**(client_states or {}), RNG_STATE_KEY: torch.get_rng_state()}
        losses = getattr(getattr(self, "trainer", None), "losses", {})
        fitted = {name: state for name, signal in losses.items() if (state := signal.state_dict())}
        if fitted:
            states[SIGNAL_STATE_KEY] = fitted
        super().save_checkpoint(tag, states, **kwargs)

    def restore_signal_states(self) -> bool:
        """Load the loss signals' fitted states from the loaded checkpoint's client states into the trainer (removed
        from them, so the trainer does not log them): its first step then keeps them (a frozen hidden-state bridge is
        not fitted again). False when there are none."""
        saved = (getattr(self, "checkpoint_states", None) or {}).pop(SIGNAL_STATE_KEY, None)
        losses = getattr(getattr(self, "trainer", None), "losses", {})
        if not saved or not losses:
            return False
        device = next(self.trainer.actor.parameters()).device
        for name, signal in losses.items():
            signal.load_state_dict(saved.get(name, {}), device)
        return True

    def restore_rng_state(self) -> bool:
        """Restore the torch RNG state from the loaded checkpoint's client states (removed from them, so the trainer
        does not log it); False when there is none (a fresh start, or a checkpoint written without it)."""
        state = (getattr(self, "checkpoint_states", None) or {}).pop(RNG_STATE_KEY, None)
        if state is None:
            return False
        torch.set_rng_state(state)
        return True
