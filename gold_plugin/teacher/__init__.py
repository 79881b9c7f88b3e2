"""Teacher service (docs/design.md, "Teacher"; docs/teacher.md): score student responses with the teacher's own tokenizer and template.

- :class:`TeacherRequest` / :class:`TeacherResult` and the :class:`TeacherScorer` contract (no Ray);
- backends :class:`HFTeacher` (transformers, CPU or GPU) and :class:`VLLMTeacher` (vLLM prompt log-probs), and
  :class:`ServedTeacher` (a teacher already served by vLLM's OpenAI-compatible server, over HTTP);
- ``generate(prompts, GenerationParams)`` on every backend and the group: teacher-written completions
  (:class:`TeacherGeneration`) for off-policy samples (``--gold.off_policy_source teacher``);
- :func:`build_teacher` from a :class:`~gold_plugin.config.TeacherConfig`;
- Ray: :data:`TeacherActor` (one replica) and :class:`TeacherGroup` (a batch split over replicas, dead
  replicas restarted). These, and the backends, are imported on first use: ``import gold_plugin.teacher``
  loads neither Ray, transformers nor vLLM.

Three lines::

    from gold_plugin.teacher import HFTeacher, TeacherRequest
    teacher = HFTeacher("path/to/teacher", topk=8)
    [result] = teacher.score([TeacherRequest([{"role": "user", "content": "2+2?"}], "4", ends_with_eos=True)])
"""

from __future__ import annotations

import importlib
from typing import Any

from gold_plugin.teacher.types import TeacherError, TeacherRequest, TeacherResult, TeacherScorer

_LAZY = {
    "HFTeacher": "gold_plugin.teacher.hf",
    "VLLMTeacher": "gold_plugin.teacher.vllm_backend",
    "ServedTeacher": "gold_plugin.teacher.server",
    "TeacherServerError": "gold_plugin.teacher.server",
    "parse_prompt_logprobs": "gold_plugin.teacher.vllm_backend",
    "build_teacher": "gold_plugin.teacher.factory",
    "RequestEncoder": "gold_plugin.teacher.prepare",
    "GenerationParams": "gold_plugin.teacher.generation",
    "TeacherGeneration": "gold_plugin.teacher.generation",
    "TeacherActor": "gold_plugin.teacher.ray_group",
    "TeacherBatch": "gold_plugin.teacher.ray_group",
    "TeacherGroup": "gold_plugin.teacher.ray_group",
    "TeacherReplica": "gold_plugin.teacher.ray_group",
    "TeacherReplicaError": "gold_plugin.teacher.ray_group",
}

__all__ = ["TeacherError", "TeacherRequest", "TeacherResult", "TeacherScorer", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gold_plugin.teacher' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
