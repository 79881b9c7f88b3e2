"""Ray teacher service: one actor per replica, and a group that splits batches and survives dead replicas."""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

from gold_plugin.config import GoldConfig, TeacherConfig
from gold_plugin.teacher.generation import GenerationParams, Prompt, TeacherGeneration
from gold_plugin.teacher.types import TeacherError, TeacherRequest, TeacherResult, TeacherScorer, filled

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

    from gold_plugin.alignment.types import ChatTokenizer

logger = logging.getLogger(__name__)

_REPLICA_DEATH = (RayActorError, WorkerCrashedError)


class TeacherReplicaError(TeacherError):
    """A teacher replica failed for good (died more often than allowed, or its scorer raised)."""


class TeacherReplica:
    """One teacher replica: a scorer built from a :class:`TeacherConfig` (the body of :data:`TeacherActor`)."""

    def __init__(self, teacher_config: dict[str, Any], replica_index: int, overrides: dict[str, Any]) -> None:
        from gold_plugin.teacher.factory import build_teacher

        self.replica_index = replica_index
        self.scorer = build_teacher(TeacherConfig(**teacher_config), **overrides)

    def ready(self) -> dict[str, int | str | None]:
        """Identity of the process that serves this replica."""
        device = getattr(self.scorer, "device", None)
        return {"replica": self.replica_index, "pid": os.getpid(), "device": str(device) if device else None}

    def score(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        return self.scorer.score(requests)

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[TeacherGeneration]:
        return self.scorer.generate(prompts, params)


TeacherActor = ray.remote(TeacherReplica)
"""Ray actor class of one teacher replica; :class:`TeacherGroup` sets its GPUs/CPUs from the config."""


def _request_size(request: TeacherRequest) -> int:
    prompt = request.prompt
    if isinstance(prompt, str):
        size = len(prompt)
    else:
        size = sum(len(str(m.get("content", ""))) for m in prompt) if isinstance(prompt, list) else 0
    return size + len(request.response) if isinstance(request.response, str) else size


def split_balanced(sizes: Sequence[int], num_parts: int) -> list[list[int]]:
    """Indices per part, greedy longest-first onto the least loaded part; each part keeps input order."""
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    heap = [(0, part) for part in range(num_parts)]
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        load, part = heapq.heappop(heap)
        parts[part].append(index)
        heapq.heappush(heap, (load + max(1, sizes[index]), part))
    return [sorted(p) for p in parts]


class TeacherBatch:
    """A batch in flight over the group's replicas (from :meth:`TeacherGroup.score_async`).

    ``refs`` are the Ray ``ObjectRef`` of each replica's share (they change when a share is retried);
    :meth:`result` waits, restarts dead replicas, retries their shares and returns the results in
    request order; :attr:`retries` then counts the shares it re-sent. ``method`` is the replica method each share
    calls (``score``, or ``generate`` with ``extra = (params,)``).
    """

    def __init__(
        self,
        group: TeacherGroup,
        requests: list[Any],
        shares: list[tuple[int, list[int]]],
        method: str = "score",
        extra: tuple[Any, ...] = (),
    ):
        self._group = group
        self._requests = requests
        self._shares = shares
        self._method, self._extra = method, extra
        self._verb = "scoring" if method == "score" else "generating for"
        self._attempts = [0] * len(shares)
        self._actors: list[ActorHandle] = []
        self.refs: list[ObjectRef] = []
        for replica, indices in shares:
            actor, ref = group._submit(replica, [requests[i] for i in indices], method, extra)
            self._actors.append(actor)
            self.refs.append(ref)
        self._results: list[TeacherResult] | None = None if requests else []

    @property
    def retries(self) -> int:
        """Shares re-sent so far because their replica died (each re-send counts once)."""
        return sum(self._attempts)

    def done(self) -> bool:
        """True when every share has an answer (ready or failed); :meth:`result` will not block then."""
        if self._results is not None:
            return True
        ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        return len(ready) == len(self.refs)

    def result(self, timeout: float | None = None) -> list[Any]:
        """The results in request order. Raises :class:`TeacherReplicaError` naming the replica when a
        share failed after ``max_retries`` restarts (or its scorer raised), ``TimeoutError`` on timeout."""
        if self._results is not None:
            return self._results
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[TeacherResult | None] = [None] * len(self._requests)
        pending = set(range(len(self._shares)))
        while pending:
            refs = [self.refs[s] for s in pending]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(refs, num_returns=1, timeout=left)
            if not ready:
                raise TimeoutError(f"Teacher batch ({self._method}) not done within {timeout} s.")
            share = next(s for s in pending if self.refs[s] == ready[0])
            replica, indices = self._shares[share]
            try:
                out = ray.get(ready[0])
            except _REPLICA_DEATH as exc:
                self._retry(share, exc)
                continue
            except RayTaskError as exc:
                raise TeacherReplicaError(
                    f"Teacher replica {self._group.replica_name(replica)} failed while {self._verb} "
                    f"{len(indices)} requests: {exc.cause if exc.cause is not None else exc}"
                ) from exc
            if len(out) != len(indices):
                raise TeacherReplicaError(
                    f"Teacher replica {self._group.replica_name(replica)} returned {len(out)} results "
                    f"for {len(indices)} requests."
                )
            for index, item in zip(indices, out):
                results[index] = item
            pending.discard(share)
        self._results = filled(results)
        return self._results

    def _retry(self, share: int, exc: Exception) -> None:
        replica, indices = self._shares[share]
        self._attempts[share] += 1
        name = self._group.replica_name(replica)
        if self._attempts[share] > self._group.max_retries:
            raise TeacherReplicaError(
                f"Teacher replica {name} died {self._attempts[share]} times while {self._verb} "
                f"{len(indices)} requests (max_retries={self._group.max_retries}); last error: {exc}"
            ) from exc
        logger.warning("Teacher replica %s died (%s); restarting it and retrying its share.", name, exc)
        self._group._restart(replica, dead=self._actors[share])
        actor, ref = self._group._submit(
            replica, [self._requests[i] for i in indices], self._method, self._extra
        )
        self._actors[share] = actor
        self.refs[share] = ref


class TeacherGroup(TeacherScorer):
    """``num_replicas`` teacher actors scoring one batch together: a :class:`TeacherScorer`.

    A batch is split over the replicas by size (each share keeps request order); results come back in
    request order. A replica that dies while holding a share is restarted and the share is retried, up
    to ``max_retries`` times per share; then :class:`TeacherReplicaError` names the replica.
    :meth:`score_counting_retries` also says how many shares of the call were re-sent (``num_restarts``
    counts the group's restarts over its life); :meth:`score_async` starts a batch and returns at once (its
    :meth:`TeacherBatch.result` takes a timeout). :attr:`tokenizer` is loaded here, on first use, from the config
    (or is the ``tokenizer`` of ``scorer_overrides``), as the replicas load theirs.

    Args:
        config: a :class:`TeacherConfig` (or a :class:`GoldConfig`, whose ``teacher`` is used).
        num_replicas: default ``config.num_replicas``.
        scorer_overrides: extra backend constructor arguments (e.g. ``{"device": "cpu"}``).
        actor_options: extra Ray actor options (e.g. a placement-group scheduling strategy).
        start_timeout_s: how long a replica may take to be scheduled and load its model.
    """

    def __init__(
        self,
        config: TeacherConfig | GoldConfig,
        num_replicas: int | None = None,
        *,
        max_retries: int | None = None,
        scorer_overrides: dict[str, Any] | None = None,
        actor_options: dict[str, Any] | None = None,
        name: str = "teacher",
        start_timeout_s: float = 1800.0,
    ) -> None:
        teacher = config.teacher if isinstance(config, GoldConfig) else config
        if not isinstance(teacher, TeacherConfig):
            raise TypeError(f"TeacherGroup needs a TeacherConfig or GoldConfig, got {type(config).__name__}.")
        self.config = teacher
        self.num_replicas = int(num_replicas if num_replicas is not None else teacher.num_replicas)
        self.max_retries = int(max_retries if max_retries is not None else teacher.max_retries)
        if self.num_replicas < 1 or self.max_retries < 0:
            raise ValueError("TeacherGroup needs num_replicas >= 1 and max_retries >= 0.")
        self.name = name
        self.topk = int(teacher.topk or 0)  # as build_teacher gives the replicas
        self.start_timeout_s = start_timeout_s
        self.num_restarts = 0
        self._overrides = dict(scorer_overrides or {})
        self._actor_options = dict(actor_options or {})
        self._config_dict = dataclasses.asdict(teacher)
        self._tokenizer: ChatTokenizer | None = self._overrides.get("tokenizer")
        self.replicas: list[ActorHandle] = [self._create(i) for i in range(self.num_replicas)]
        try:
            self._wait_ready(range(self.num_replicas))
        except BaseException:
            self.close()  # no replica left pending, holding or waiting for resources
            raise

    @property
    def tokenizer(self) -> ChatTokenizer:
        """The teacher's tokenizer, the one the replicas' token ids refer to (loaded on first use)."""
        if self._tokenizer is None:
            from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

            self._tokenizer = load_teacher_tokenizer(self.config)
        return self._tokenizer

    # -- replicas ---------------------------------------------------------------------------------
    def replica_name(self, replica: int) -> str:
        return f"{self.name}-{replica}"

    def _resources(self) -> dict[str, float]:
        gpus = self.config.num_gpus_per_replica
        if self.config.backend == "vllm" and self.config.tensor_parallel_size > 1:
            gpus = 0  # vLLM places its tensor-parallel workers itself (distributed_executor_backend="ray")
        return {"num_gpus": gpus, "num_cpus": getattr(self.config, "num_cpus_per_replica", 1.0)}

    def _create(self, replica: int) -> ActorHandle:
        options = {**self._resources(), "max_restarts": 0, "max_task_retries": 0, **self._actor_options}
        return TeacherActor.options(**options).remote(self._config_dict, replica, self._overrides)

    def _wait_ready(self, replicas: Sequence[int]) -> None:
        for replica in replicas:
            try:
                ray.get(self.replicas[replica].ready.remote(), timeout=self.start_timeout_s)
            except GetTimeoutError as exc:
                resources = self._resources()
                raise TeacherReplicaError(
                    f"Teacher replica {self.replica_name(replica)} did not start within {self.start_timeout_s} s: "
                    f"the cluster may lack {resources['num_gpus']} GPU / {resources['num_cpus']} CPU for it "
                    f"(available: {ray.available_resources()}); lower --gold.teacher.num_replicas or the "
                    "per-replica resources."
                ) from exc
            except Exception as exc:
                raise TeacherReplicaError(
                    f"Teacher replica {self.replica_name(replica)} failed to start: {exc}"
                ) from exc

    def _restart(self, replica: int, dead: ActorHandle) -> None:
        """Replace replica ``replica`` unless another batch already replaced the ``dead`` handle."""
        if self.replicas[replica] is not dead:
            return
        with contextlib.suppress(Exception):  # already gone
            ray.kill(dead, no_restart=True)
        self.replicas[replica] = self._create(replica)
        self.num_restarts += 1
        self._wait_ready([replica])

    def _submit(
        self, replica: int, requests: list[Any], method: str = "score", extra: tuple[Any, ...] = ()
    ) -> tuple[ActorHandle, ObjectRef]:
        actor = self.replicas[replica]
        return actor, getattr(actor, method).remote(requests, *extra)

    # -- scoring ----------------------------------------------------------------------------------
    def score_async(self, requests: Sequence[TeacherRequest]) -> TeacherBatch:
        """Start scoring ``requests`` on all replicas and return at once (overlap it with other work)."""
        requests = list(requests)
        parts = split_balanced([_request_size(r) for r in requests], self.num_replicas)
        shares = [(replica, indices) for replica, indices in enumerate(parts) if indices]
        return TeacherBatch(self, requests, shares)

    def score(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        """Score ``requests`` over the replicas; one result per request, in order."""
        return self.score_async(requests).result()

    def score_counting_retries(self, requests: Sequence[TeacherRequest]) -> tuple[list[TeacherResult], int]:
        """:meth:`score`, and the number of shares re-sent because their replica died (0 when none died)."""
        batch = self.score_async(requests)
        results = batch.result()
        return results, batch.retries

    # -- generation (teacher-generated off-policy completions) -------------------------------------
    def generate_async(self, prompts: Sequence[Prompt], params: GenerationParams) -> TeacherBatch:
        """Start generating one completion per prompt on all replicas (shares split by prompt size, each replica
        seeded by ``params.seed``) and return at once; dead replicas are restarted and their shares retried as
        for scoring."""
        prompts = list(prompts)
        sizes = [_request_size(TeacherRequest(p, "")) for p in prompts]
        parts = split_balanced(sizes, self.num_replicas)
        shares = [(replica, indices) for replica, indices in enumerate(parts) if indices]
        return TeacherBatch(self, prompts, shares, method="generate", extra=(params,))

    def generate(
        self, prompts: Sequence[Prompt], params: GenerationParams, timeout: float | None = None
    ) -> list[TeacherGeneration]:
        """One completion per prompt, in order (:meth:`HFTeacher.generate` / :meth:`VLLMTeacher.generate` on the
        replicas)."""
        return self.generate_async(prompts, params).result(timeout=timeout)

    def generate_counting_retries(
        self, prompts: Sequence[Prompt], params: GenerationParams, timeout: float | None = None
    ) -> tuple[list[TeacherGeneration], int]:
        """:meth:`generate`, and the number of shares re-sent because their replica died."""
        batch = self.generate_async(prompts, params)
        results = batch.result(timeout=timeout)
        return results, batch.retries

    def close(self) -> None:
        """Kill every replica; the group is unusable afterwards."""
        for actor in self.replicas:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.replicas = []


__all__ = [
    "TeacherActor",
    "TeacherBatch",
    "TeacherGroup",
    "TeacherReplica",
    "TeacherReplicaError",
    "split_balanced",
]
