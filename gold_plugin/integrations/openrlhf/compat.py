"""Where the plugin enters OpenRLHF 0.11.2's own code: every such place is here, with :func:`check`, which the policy
actor runs at start (:func:`require_compatible`), so that an OpenRLHF whose code moved fails at once, naming what.

Subclasses (the experience maker, the trainers, the policy actor) are ordinary extension; OpenRLHF has no hook
for the rest, so the plugin enters at these points (the name, OpenRLHF's code it relies on, what the plugin does):

- ``backward``: ``ActorPPOTrainer.training_step`` makes one ``self.strategy.backward(loss, ...)``; for the step the
  trainer's strategy is a :class:`BackwardAddsLoss`, which adds the GOLD terms to that loss.
- ``actor_output``: the step's ``self.actor(..., return_output=True)`` returns ``(log_probs, output)``; a forward
  hook on the actor reads the logits from ``output`` (and transformers' hooks the student's hidden states).
- ``kl_and_entropy``: the step reduces its KL-to-reference loss and its entropy term with ``aggregate_loss(values,
  experience.action_mask, ...)``; the name is :func:`rebound` for the step, to leave off-policy tokens out.
- ``windows``: ``ActorPPOTrainer.ppo_train`` pairs micro-batches with their optimiser step's normalisers through
  ``iter_grad_accum_global_norm``; the name is rebound for the call, to add the hidden-state group count.
- ``actor_trainer``: ``PolicyModelActor.init_model_from_pretrained`` builds ``self.trainer = ActorPPOTrainer(...)``;
  the GOLD policy actor sets that instance's class to the GOLD subclass.
- ``async_actors``: ``PPOTrainerAsync.__init__`` starts ``GenerateSamplesActor`` and ``TrainingActor``; the names
  are rebound for the constructor to the GOLD actors (:func:`with_arguments` adds the teacher).

The hook that would let OpenRLHF take the GOLD terms without any of this: an overridable
``ActorPPOTrainer.extra_loss(experience, output, loss_batch_info) -> (term, metrics)`` added to the loss before its
backward (``output`` holding the logits and, on request, the hidden states of chosen layers); a per-token weight
in ``Experience`` that ``aggregate_loss`` applies to the KL and entropy terms; an ``extra_counts`` callback in
``iter_grad_accum_global_norm``'s normalisers; and the trainer classes as attributes (``PolicyModelActor.
trainer_class``, ``PPOTrainerAsync.generator_class`` / ``training_class``) instead of names in the constructors.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

OPENRLHF_VERSION = "0.11.2"


@dataclass(frozen=True)
class Entry:
    """One place the plugin enters OpenRLHF: the function it relies on, what that function's source must still
    contain, and the module-level names it reads that the plugin rebinds (:func:`rebound`)."""

    name: str
    function: Callable[[], Callable]
    """Returns OpenRLHF's function (imported on call, so that this module imports without OpenRLHF)."""
    markers: tuple[str, ...]
    rebinds: tuple[str, ...] = ()


def _training_step() -> Callable:
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    return ActorPPOTrainer.training_step


def _ppo_train() -> Callable:
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    return ActorPPOTrainer.ppo_train


def _init_model() -> Callable:
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

    return PolicyModelActor.__ray_actor_class__.init_model_from_pretrained


def _async_init() -> Callable:
    from openrlhf.trainer.ppo_trainer_async import PPOTrainerAsync

    return PPOTrainerAsync.__ray_actor_class__.__init__


ENTRIES = (
    Entry("backward", _training_step, ("self.strategy.backward(loss, self.actor, self.actor_optim)",)),
    Entry("actor_output", _training_step, ("action_log_probs, output = self.actor(", "return_output=True")),
    Entry(
        "kl_and_entropy",
        _training_step,
        ("aggregate_loss(kl, experience.action_mask", "entropy_loss = aggregate_loss("),
        ("aggregate_loss",),
    ),
    Entry("windows", _ppo_train, ("iter_grad_accum_global_norm(",), ("iter_grad_accum_global_norm",)),
    Entry("actor_trainer", _init_model, ("self.trainer = ActorPPOTrainer(",)),
    Entry(
        "async_actors",
        _async_init,
        ("GenerateSamplesActor.remote(", "TrainingActor.remote("),
        ("GenerateSamplesActor", "TrainingActor"),
    ),
)
"""Every entry; :func:`check` reads them in OpenRLHF's installed code."""


def check(entries: tuple[Entry, ...] | None = None) -> list[str]:
    """What no longer fits the installed OpenRLHF (``entries``: :data:`ENTRIES`): one line per missing function,
    marker or rebound name (empty when every entry fits)."""
    stale = []
    for entry in ENTRIES if entries is None else entries:
        try:
            function = entry.function()
            source = inspect.getsource(function)
        except (ImportError, AttributeError, OSError, TypeError) as error:
            stale.append(f"{entry.name}: {error}")
            continue
        stale += [f"{entry.name}: {marker!r} not found" for marker in entry.markers if marker not in source]
        stale += [
            f"{entry.name}: {function.__qualname__} no longer reads the module-level name {name!r}"
            for name in entry.rebinds
            if name not in function.__globals__
        ]
    return stale


def require_compatible() -> None:
    """Raise when an entry no longer fits the installed OpenRLHF (:func:`check`)."""
    stale = check()
    if stale:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("openrlhf")
        except PackageNotFoundError:
            installed = "unknown"
        raise RuntimeError(
            f"gold_plugin enters OpenRLHF {OPENRLHF_VERSION}'s code at places that the installed OpenRLHF "
            f"({installed}) no longer has: "
            + "; ".join(stale)
            + ". Install openrlhf=="
            + OPENRLHF_VERSION
            + "."
        )


@contextlib.contextmanager
def rebound(function: Callable, name: str, replacement: Any) -> Iterator[Any]:
    """Within: the module-level ``name`` that OpenRLHF's ``function`` reads is ``replacement``; yields the
    original. Restored on exit, also after an error."""
    namespace = function.__globals__
    if name not in namespace:
        raise RuntimeError(
            f"OpenRLHF's {function.__qualname__} no longer reads the module-level name {name!r}."
        )
    original = namespace[name]
    namespace[name] = replacement
    try:
        yield original
    finally:
        namespace[name] = original


class with_arguments:  # noqa: N801 (stands in for a Ray actor class: used as ``X.remote(...)``)
    """A Ray actor class whose ``.remote(...)`` also passes ``kwargs``: what :func:`rebound` puts in place of an
    OpenRLHF actor class that OpenRLHF starts itself, when the GOLD actor needs more arguments (the teacher)."""

    def __init__(self, actor_class: Any, **kwargs: Any) -> None:
        self.actor_class, self.kwargs = actor_class, kwargs

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.actor_class.remote(*args, **kwargs, **self.kwargs)


class BackwardAddsLoss:
    """Delegates to the real strategy, but adds one pending loss term to the first ``backward`` it sees."""

    def __init__(self, strategy: Any, extra_loss: Callable[[], torch.Tensor]) -> None:
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
