"""``GoldExperienceMaker``: OpenRLHF's experience maker plus the teacher's aligned signal.

An adapter around :mod:`gold_plugin.step` (the GOLD step both backends share). For every rollout batch it

1. with ``--gold.lmbda < 1``, replaces the sampled responses of a drawn ``1 - lmbda`` share of the prompts by
   a tokenised off-policy completion (the dataset's reference, ``--data.output_key``, or one the teacher writes:
   ``--gold.off_policy_source``) before any model forward, and marks those samples ``gold/off_policy`` (their
   advantages are set to 0: no policy gradient on text the student did not sample; the logit loss trains on them);
2. builds the teacher requests (response text from the student's canonical token bytes; the teacher prompt from
   shared rule :func:`gold_plugin.step.teacher_prompt`: the raw chat messages of the prompt lookup, rendered with
   the teacher's template, else the student's prompt text, counted in ``gold/teacher_prompt_fallback``) and sends them on a background thread, so that teacher
   scoring overlaps the actor / reference / critic forwards that OpenRLHF dispatches in ``make_experience``;
3. aligns, computes the raw distillation advantages and every loss signal's inputs (:meth:`gold_plugin.step.
   LossSignal.prepare`) of every rollout micro-batch, and the per-sample ``gold/*`` metrics;
4. in ``compute_advantages_and_returns`` lets OpenRLHF compute its own advantages for the chosen estimator, then
   :func:`gold_plugin.step.gold_advantages` normalises the distillation advantages over the whole rollout
   (``--gold.advantage_norm``) and mixes: ``A = (1 - alpha) A_reward + alpha kl_coef norm(A_distill)``.

With ``alpha == 1`` the rollouts' rewards are replaced by zeros before OpenRLHF sees them: no reward model is
called and no reward is read. The loss signals' inputs (the logit-loss inputs; the hidden-state loss's group ends
and the teacher's sketched states there) travel to the policy actor in ``Experience.info`` (:mod:`.transport`).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

from gold_plugin.config import GoldConfig
from gold_plugin.step import (
    AlignedBatch,
    LogitVocab,
    NoSignalWatch,
    align_results,
    distill_advantages,
    draw_off_policy,
    gold_advantages,
    loss_signals,
    off_policy_responses,
    response_ends_with_eos,
    sample_metrics,
    teacher_completion_call,
    teacher_prompt,
    teacher_requests,
)
from gold_plugin.teacher.generation import generate_counting_retries
from gold_plugin.teacher.hf import shipped_state_width
from gold_plugin.teacher.types import ChatMessages, TeacherRequest, TeacherResult, TeacherScorer

from .transport import OFF_POLICY_KEY, pack_signal

if TYPE_CHECKING:
    from gold_plugin.alignment.types import Tokenizer

DISTILL_ADVANTAGES_KEY = "gold_distill_advantages"
"""(batch, num_actions) raw distillation advantages, from make_experience to compute_advantages_and_returns."""
SIGNAL_MASK_KEY = "gold_signal_mask"
"""(batch, num_actions) bool: tokens of scored groups (the normalisation's statistics), popped with the above."""
"""Per sample: its aligned groups with hidden-state targets; a logged metric (the local backend's, per sample)."""
MISSING_REFERENCE_KEY = "gold/missing_reference"
OFF_POLICY_TEACHER_KEY = "gold/off_policy_teacher"
"""Per-sample 1.0 for an off-policy completion the teacher wrote (``--gold.off_policy_source``); a logged metric."""
TEACHER_RETRIES_KEY = "gold/teacher_retries"
"""Per sample: parts of its rollout's teacher call re-sent (a share whose ``TeacherGroup`` replica died, a request
to a served teacher that failed for a while)."""


def _response_positions(action_mask_row: torch.Tensor) -> tuple[np.ndarray, bool]:
    index = torch.nonzero(action_mask_row.to(torch.bool), as_tuple=False).flatten().numpy()
    contiguous = index.size == 0 or int(index[-1] - index[0] + 1) == index.size
    return index, contiguous


class _TeacherBatch(TypedDict):
    """One micro-batch's share of the teacher call (:meth:`GoldExperienceMaker._samples_for_teacher`)."""

    responses: list[np.ndarray]
    problems: list[str | None]
    requests: list[TeacherRequest | None]
    fallback: torch.Tensor


class GoldExperienceMaker(RemoteExperienceMaker):
    """OpenRLHF's ``RemoteExperienceMaker`` with GOLD distillation advantages and logit-loss inputs.

    Args (beyond the base class's):
        teacher: a :class:`~gold_plugin.teacher.TeacherScorer` (a ``TeacherGroup`` of Ray actors on a cluster, or an
            in-process scorer).
        gold_config: the run's :class:`GoldConfig`.
        teacher_tokenizer: the tokenizer the teacher's token ids refer to (default: ``teacher.tokenizer``).
        prompt_lookup: ``{student prompt string: raw chat messages}`` for the teacher's own chat template.
        reference_lookup: ``{student prompt string: reference completion}`` (``--data.output_key``), for
            ``--gold.lmbda < 1`` (not needed with ``--gold.off_policy_source teacher``). With a source that
            involves the teacher, ``teacher`` must also have ``generate`` (``TeacherGroup``, ``HFTeacher``,
            ``VLLMTeacher``).
    """

    def __init__(
        self,
        *args: Any,
        teacher: TeacherScorer,
        gold_config: GoldConfig,
        teacher_tokenizer: Tokenizer | None = None,
        prompt_lookup: dict[str, ChatMessages] | None = None,
        reference_lookup: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.gold = gold_config
        self.teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else teacher.tokenizer
        self.prompt_lookup = prompt_lookup or {}
        self.reference_lookup = reference_lookup or {}
        vocab = (
            LogitVocab.build(self.tokenizer, self.teacher_tokenizer, gold_config)
            if gold_config.logit_projection == "bytes"
            else LogitVocab()
        )  # the byte projection's inputs need the byte-sorted student vocabulary; the vocabulary map, only the loss
        teacher_options = gold_config.teacher
        state_shape = (
            (
                int(teacher_options.hidden_state_layers or 0),
                shipped_state_width(teacher_options.model_name_or_path, teacher_options.hidden_state_rank),
            )
            if gold_config.uses_hidden_states
            else None
        )
        self.losses = loss_signals(
            gold_config, vocab, student_num_layers=None, teacher_state_shape=state_shape
        )
        """The run's loss signals, on the rollout side: what each ships to the actor (:meth:`LossSignal.prepare`).
        A batch without hidden-state group carries the teacher's shipped state shape ``(L, r)`` (the last seen; until
        then the options', ``r`` capped at the teacher's hidden size as its sketch is), so that OpenRLHF can
        concatenate micro-batches."""
        self.draw_step = 0
        """The ``step`` of the next seeded off-policy draw. The GOLD trainers set it to OpenRLHF's global step before
        every rollout batch (:class:`~gold_plugin.integrations.openrlhf.trainer.DrawAtGlobalStep`), a counter
        OpenRLHF saves in its checkpoint and restores on ``--ckpt.load_enable``, so a resumed job draws what the
        uninterrupted job drew; left alone it counts the batches this maker has made."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gold-teacher")
        self.no_signal = NoSignalWatch(gold_config.max_steps_without_signal)

    # ── off-policy samples (lmbda) ──

    def split_rollout_samples(self, rollout_samples: list[Experience]) -> list[Experience]:
        """Mark every sample on/off-policy (replacing the drawn prompts' responses), then let OpenRLHF batch them
        in prompt order.

        OpenRLHF's samples generator lists each prompt's samples (together, in their own order) when vLLM finishes
        them, an order that changes from job to job; a stable sort by prompt keeps each prompt's samples together
        and in order (OpenRLHF's group estimators need them so) and makes the micro-batches, the replay buffer's
        order and so the float rounding of the forwards and the training step the same in every job."""
        self._use_reference_completions(rollout_samples)
        ordered = sorted(rollout_samples, key=lambda s: s.prompts[0] if s.prompts else "")
        return super().split_rollout_samples(ordered)

    def _use_reference_completions(self, samples: list[Experience]) -> None:
        """Replace the responses of the drawn prompts by their off-policy completion (the dataset's reference or
        the teacher's, :func:`gold_plugin.step.off_policy_responses`) and mark every sample."""
        step, self.draw_step = self.draw_step, self.draw_step + 1
        prompts = [s.prompts[0] if s.prompts else "" for s in samples]
        distinct = sorted(set(prompts))  # the draw depends on the batch's prompts, not on the samples' order
        references = [self.reference_lookup.get(p) for p in distinct]
        draw = draw_off_policy(references, self.gold, self.args.train.seed, step, distinct)
        rollout = self.args.rollout
        chat = bool(getattr(self.args.data, "apply_chat_template", False))
        call = teacher_completion_call(
            draw,
            [
                teacher_prompt(p, self.prompt_lookup.get(p), self.gold, chat)[0] if draw.teacher[i] else None
                for i, p in enumerate(distinct)
            ],
            max_new_tokens=rollout.max_new_tokens,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            seed=self.args.train.seed,
            step=step,
        )
        start = time.perf_counter()
        generations, retries = (
            generate_counting_retries(self.teacher, call.prompts, call.params) if call.params else ([], 0)
        )
        seconds = time.perf_counter() - start
        completions = off_policy_responses(
            self.tokenizer, draw, references, call, generations, max_new_tokens=rollout.max_new_tokens
        )
        draw = completions.draw
        index_of = {p: i for i, p in enumerate(distinct)}
        for sample, prompt in zip(samples, prompts):
            i = index_of[prompt]
            if draw.off_policy[i]:
                self._replace_response(sample, completions.response_ids[i])
            sample.info[OFF_POLICY_KEY] = torch.tensor([float(draw.off_policy[i])])
            sample.info[MISSING_REFERENCE_KEY] = torch.tensor([float(draw.missing_reference[i])])
            sample.info[OFF_POLICY_TEACHER_KEY] = torch.tensor([float(draw.teacher[i])])
            if self.gold.teacher_generates:  # the step's teacher-generation call (every sample carries it)
                sample.info["gold/teacher_generation_seconds"] = torch.tensor([seconds])
                sample.info["gold/teacher_generation_retries"] = torch.tensor([float(retries)])

    def _replace_response(self, sample: Experience, response_ids: list[int]) -> None:
        """Make the single-sample ``sample`` hold ``prompt + response_ids`` (cut at ``--data.max_len``)."""
        if sample.sequences.shape[0] != 1:
            raise ValueError("Reference completions replace single rollout samples (before batching).")
        actions = torch.nonzero(sample.action_mask[0].to(torch.bool)).flatten()
        prompt_len = int(actions[0]) + 1 if actions.numel() else int(sample.sequences.shape[1])
        prompt = sample.sequences[0, :prompt_len]
        response = torch.tensor(response_ids, dtype=prompt.dtype)
        max_len = int(getattr(self.args.data, "max_len", 0) or 0) or None
        sequence = torch.cat([prompt, response])[:max_len]
        length = int(sequence.shape[0])
        action_mask = torch.zeros(length - 1, dtype=sample.action_mask.dtype)
        action_mask[prompt_len - 1 :] = 1
        sample.sequences = sequence[None]
        sample.attention_mask = torch.ones(1, length, dtype=sample.attention_mask.dtype)
        sample.action_mask = action_mask[None]
        if sample.rollout_log_probs is not None:  # set to the actor's own log-probs after the forwards
            sample.rollout_log_probs = torch.zeros(1, length - 1, dtype=sample.rollout_log_probs.dtype)
        sample.response_length = torch.tensor([max(length - prompt_len, 0)])
        sample.total_length = torch.tensor([float(length)])
        clipped = max_len is not None and length >= max_len
        if sample.truncated is not None:  # as vLLM's finish_reason == "length": the response has no end token
            sample.truncated = torch.tensor(
                [not response_ends_with_eos(self.tokenizer, sequence[prompt_len:])]
            )
        if "response_clip_ratio" in sample.info:
            sample.info["response_clip_ratio"] = torch.tensor([clipped])

    # ── teacher requests ──

    def _score(self, requests: list[TeacherRequest]) -> tuple[list[TeacherResult], float, int]:
        """(results in request order, scoring seconds, parts of the call re-sent: :meth:`TeacherScorer.score_counting_retries`)."""
        start = time.perf_counter()
        results, retries = self.teacher.score_counting_retries(requests) if requests else ([], 0)
        if len(results) != len(requests):
            raise RuntimeError(f"The teacher returned {len(results)} results for {len(requests)} requests.")
        return results, time.perf_counter() - start, retries

    def _samples_for_teacher(self, samples_list: list[Experience]) -> list[_TeacherBatch]:
        """Per micro-batch: response ids, teacher requests (None where a response cannot be sent) and reasons."""
        out: list[_TeacherBatch] = []
        for samples in samples_list:
            responses: list[np.ndarray] = []
            problems: list[str | None] = []
            prompts: list[str | ChatMessages] = []
            fallback: list[bool] = []
            sendable: list[bool] = []
            for b in range(samples.sequences.shape[0]):
                index, contiguous = _response_positions(samples.action_mask[b])
                responses.append(samples.sequences[b, 1:][torch.as_tensor(index, dtype=torch.long)].numpy())
                problems.append(None if contiguous else "response is not one contiguous span")
                student_prompt = samples.prompts[b] if b < len(samples.prompts) else ""
                prompt, fell_back = teacher_prompt(
                    student_prompt,
                    self.prompt_lookup.get(student_prompt),
                    self.gold,
                    bool(getattr(self.args.data, "apply_chat_template", False)),
                )
                prompts.append(prompt)
                fallback.append(fell_back)
                sendable.append(contiguous)
            requests = teacher_requests(self.tokenizer, responses, prompts)
            out.append(
                {
                    "responses": responses,
                    "problems": problems,
                    "requests": [r if ok else None for r, ok in zip(requests, sendable)],
                    "fallback": torch.tensor(fallback, dtype=torch.float32),
                }
            )
        return out

    # ── OpenRLHF hooks ──

    @torch.no_grad()
    def make_experience(self, samples_list: list[Experience]) -> list[Experience]:
        """OpenRLHF's forwards, overlapped with teacher scoring, then the GOLD signal attached to every sample."""
        start = time.perf_counter()
        batches = self._samples_for_teacher(samples_list)
        requests = [r for batch in batches for r in batch["requests"] if r is not None]
        future: Future[tuple[list[TeacherResult], float, int]] = self._executor.submit(self._score, requests)
        plugin_seconds = time.perf_counter() - start

        if not self.gold.needs_reward:
            # Reward-free: OpenRLHF must neither call a reward model nor read a reward.
            for samples in samples_list:
                zeros = torch.zeros(samples.sequences.shape[0], dtype=torch.float32)
                samples.rewards = zeros
                samples.scores = zeros.clone()
                samples.info["reward"] = zeros.clone()

        experiences = super().make_experience(samples_list)
        forwards_done = time.perf_counter()
        results, teacher_seconds, teacher_retries = future.result()
        wait_seconds = time.perf_counter() - forwards_done

        start = time.perf_counter()
        result_iter = iter(results)
        signals = []
        for experience, batch in zip(experiences, batches):
            batch_results = [next(result_iter) if r is not None else None for r in batch["requests"]]
            signals.append(
                self._attach_signal(experience, batch, batch_results, teacher_seconds, wait_seconds)
            )
        message = self.no_signal.observe(self.draw_step, signals)  # raises after too many such steps in a row
        if message is not None:
            print(f"WARNING: {message}", file=sys.stderr, flush=True)
        plugin_seconds += time.perf_counter() - start
        for experience in experiences:  # the plugin's own work: requests, alignment, signal (not the teacher)
            experience.info["gold/plugin_seconds"] = torch.full(
                (experience.action_mask.shape[0],), plugin_seconds
            )
            # Shares of this rollout's teacher call re-sent because their replica died (every sample carries the
            # call's count, so the step's mean is the count).
            experience.info[TEACHER_RETRIES_KEY] = torch.full(
                (experience.action_mask.shape[0],), float(teacher_retries)
            )
        return experiences

    def _attach_signal(
        self,
        experience: Experience,
        batch: _TeacherBatch,
        results: list[TeacherResult | None],
        teacher_seconds: float,
        wait_seconds: float,
    ) -> tuple[AlignedBatch, torch.Tensor]:
        """Attach the micro-batch's GOLD signal to ``experience``; its aligned batch and signal mask."""
        gold = self.gold
        size = experience.action_mask.shape[0]
        off = experience.info[OFF_POLICY_KEY] > 0
        if experience.rollout_log_probs is not None and bool(off.any()):
            # The reference completion was not sampled by vLLM: its rollout log-probs are the actor's own.
            experience.rollout_log_probs[off] = experience.action_log_probs[off].to(
                experience.rollout_log_probs.dtype
            )
        aligned = align_results(
            self.tokenizer,
            self.teacher_tokenizer,
            batch["responses"],
            results,
            gold,
            problems=batch["problems"],
        )
        distill, signal = distill_advantages(
            aligned, experience.action_log_probs, experience.action_mask, gold
        )
        experience.info[DISTILL_ADVANTAGES_KEY] = distill.advantages
        experience.info[SIGNAL_MASK_KEY] = signal
        for loss in self.losses.values():
            prepared, part = loss.prepare(aligned, batch["responses"], experience.action_mask)
            experience.info.update(pack_signal(loss, prepared, size))
            experience.info.update(part)
        metrics = sample_metrics(
            aligned,
            distill,
            off,
            experience.info[MISSING_REFERENCE_KEY] > 0,
            prompt_fallback=batch["fallback"],
            off_policy_teacher=experience.info[OFF_POLICY_TEACHER_KEY] > 0,
        )
        metrics["gold/teacher_seconds"] = torch.full((size,), teacher_seconds)
        metrics["gold/teacher_wait_seconds"] = torch.full((size,), wait_seconds)
        experience.info.update(metrics)
        return aligned, signal

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences: list[Experience]) -> list[Experience]:
        """OpenRLHF's advantages for its estimator, mixed with the normalised distillation advantages."""
        distill = [exp.info.pop(DISTILL_ADVANTAGES_KEY) for exp in experiences]
        signal = [exp.info.pop(SIGNAL_MASK_KEY) for exp in experiences]
        experiences = super().compute_advantages_and_returns(experiences)
        mixed = gold_advantages(
            [exp.advantages for exp in experiences],
            distill,
            signal,
            [exp.info[OFF_POLICY_KEY] > 0 for exp in experiences],
            self.gold,
        )
        for experience, advantages in zip(experiences, mixed):
            experience.advantages = advantages
        return experiences
