"""Build a teacher scorer from the typed :class:`~gold_plugin.config.TeacherConfig`."""

from __future__ import annotations

from typing import Any

from gold_plugin.config import GoldConfigError, TeacherConfig
from gold_plugin.teacher.types import TeacherScorer


def build_teacher(teacher_config: TeacherConfig, **overrides: Any) -> TeacherScorer:
    """The scorer that ``teacher_config`` describes (``hf``, ``vllm`` or ``server`` backend).

    ``overrides`` go to the backend's constructor (e.g. ``device="cpu"`` for :class:`HFTeacher`,
    ``llm=...`` for :class:`VLLMTeacher`).
    """
    if isinstance(teacher_config, dict):
        teacher_config = TeacherConfig(**teacher_config)
    if teacher_config.backend == "server":
        from gold_plugin.teacher.server import ServedTeacher

        return ServedTeacher.from_config(teacher_config, **overrides)
    if not teacher_config.model_name_or_path:
        raise GoldConfigError("Set --gold.teacher.model_name_or_path (the teacher model folder or hub name).")
    common: dict[str, Any] = {
        "tokenizer_name_or_path": teacher_config.tokenizer_name_or_path,
        "topk": teacher_config.topk or 0,  # unset outside a GoldConfig: sampled tokens only
        "max_len": teacher_config.max_len,
    }
    if teacher_config.backend == "hf":
        from gold_plugin.teacher.hf import HFTeacher

        kwargs = {
            **common,
            "micro_batch_size": teacher_config.micro_batch_size,
            "logit_chunk_size": teacher_config.logprob_chunk_size,
            "dtype": teacher_config.dtype,
            "hidden_state_layers": teacher_config.hidden_state_layers or 0,
            "hidden_state_rank": teacher_config.hidden_state_rank,
        }
        return HFTeacher(teacher_config.model_name_or_path, **{**kwargs, **overrides})
    if teacher_config.backend == "vllm":
        if teacher_config.hidden_state_layers:
            raise GoldConfigError(
                "--gold.teacher.hidden_state_layers needs --gold.teacher.backend hf (vLLM returns no hidden states)."
            )
        from gold_plugin.teacher.vllm_backend import VLLMTeacher

        kwargs = {
            **common,
            "tensor_parallel_size": teacher_config.tensor_parallel_size,
            "logprob_chunk_size": teacher_config.logprob_chunk_size,
            "dtype": teacher_config.dtype,
            "enforce_eager": teacher_config.enforce_eager,
        }
        return VLLMTeacher(teacher_config.model_name_or_path, **{**kwargs, **overrides})
    raise GoldConfigError(
        f"--gold.teacher.backend must be 'hf', 'vllm' or 'server', got {teacher_config.backend!r}."
    )
