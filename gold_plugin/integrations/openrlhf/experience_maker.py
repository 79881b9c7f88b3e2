"""``GoldExperienceMaker``: OpenRLHF's experience maker plus the teacher's aligned signal.

For every rollout micro-batch it

1. rebuilds each response's text from the student's token ids (canonical bytes, not ``decode``) and the teacher
   prompt (raw chat messages from the prompt lookup, rendered with the teacher's template; else the student's
   prompt text, counted in ``gold_teacher_prompt_fallback``);
2. sends the teacher requests on a background thread, so that teacher scoring overlaps the actor / reference /
   critic forwards that OpenRLHF dispatches in ``make_experience``;
3. aligns student and teacher tokens (docs/design.md, "Alignment"), turns the aligned log-probs into per-token distillation
   advantages (docs/design.md, "Distillation advantages") and, for the logit loss, collects the teacher's top-k at the first token of each group;
4. in ``compute_advantages_and_returns`` lets OpenRLHF compute its own advantages for the chosen estimator and
   mixes them: ``A = (1 - alpha) A_reward + alpha kl_coef A_distill``.

With ``alpha == 1`` the rollouts' rewards are replaced by zeros before OpenRLHF sees them: no reward model is
called and no reward is read. Per-token extras for the actor travel in ``info`` with the time axis last (so that
OpenRLHF's right-padding of info tensors pads time) under the keys in :data:`PER_TOKEN_INFO_KEYS`; the policy
actor pops them before OpenRLHF turns ``info`` into logged metrics.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

from gold_plugin.alignment import Alignment, align, group_starts, text_for_teacher, token_byte_lengths
from gold_plugin.config import GoldConfig
from gold_plugin.signals.advantages import batch_distill_advantages, mix_advantages
from gold_plugin.teacher.types import TeacherRequest, TeacherResult

DISTILL_ADVANTAGES_KEY = "gold_distill_advantages"
"""(batch, num_actions) distillation advantages, from make_experience to compute_advantages_and_returns."""
TOPK_IDS_KEY = "gold_topk_ids"
"""(batch, k, num_actions) int64 teacher top-k ids at the first student token of each group (teacher vocabulary)."""
TOPK_LOGPROBS_KEY = "gold_topk_logprobs"
"""(batch, k, num_actions) float32 teacher top-k log-probs (-inf for empty slots)."""
LOGIT_MASK_KEY = "gold_logit_mask"
"""(batch, num_actions) float32: 1 at the action positions where the logit loss compares distributions."""
PER_TOKEN_INFO_KEYS = (DISTILL_ADVANTAGES_KEY, TOPK_IDS_KEY, TOPK_LOGPROBS_KEY, LOGIT_MASK_KEY)


@dataclass
class _Row:
    """One rollout sample on its way to the teacher."""

    action_index: np.ndarray
    """Positions of the sample's action tokens in its row of ``action_mask`` (contiguous)."""
    response_ids: np.ndarray
    request: TeacherRequest | None
    problem: str | None = None
    prompt_fallback: bool = False


def _response_positions(action_mask_row: torch.Tensor) -> tuple[np.ndarray, bool]:
    index = torch.nonzero(action_mask_row.to(torch.bool), as_tuple=False).flatten().numpy()
    contiguous = index.size == 0 or int(index[-1] - index[0] + 1) == index.size
    return index, contiguous


def _mask_unscored_groups(alignment: Alignment, teacher_logprobs: np.ndarray) -> Alignment:
    """Drop the groups that contain a teacher token without a log-prob (NaN: it did not fit the teacher's
    context) and renumber the rest ``0..n-1``, so the alignment contract (every group on both sides) holds."""
    unscored = np.isnan(teacher_logprobs)
    if not unscored.any() or not alignment.aligned:
        return alignment
    t_group = np.asarray(alignment.teacher_group)
    bad = np.unique(t_group[unscored & (t_group >= 0)])
    keep = np.setdiff1d(np.arange(alignment.num_groups), bad)
    renumber = np.full(alignment.num_groups + 1, -1, dtype=np.int64)  # last slot maps -1 to -1
    renumber[keep] = np.arange(keep.size)
    s_group = renumber[np.asarray(alignment.student_group)]
    t_group = renumber[t_group]
    t_group[unscored] = -1
    return dataclasses.replace(
        alignment, student_group=s_group, teacher_group=t_group, num_groups=int(keep.size)
    )


class GoldExperienceMaker(RemoteExperienceMaker):
    """OpenRLHF's ``RemoteExperienceMaker`` with GOLD distillation advantages and teacher top-k (docs/design.md, "OpenRLHF integration").

    Args (beyond the base class's):
        teacher: anything with ``score(list[TeacherRequest]) -> list[TeacherResult]`` (a ``TeacherGroup`` of Ray
            actors on a cluster, or an in-process scorer).
        gold_config: the run's :class:`GoldConfig`.
        teacher_tokenizer: the tokenizer the teacher's token ids refer to (default: ``teacher.tokenizer``).
        prompt_lookup: ``{student prompt string: raw chat messages}`` for the teacher's own chat template.
    """

    def __init__(
        self,
        *args: Any,
        teacher: Any,
        gold_config: GoldConfig,
        teacher_tokenizer: Any = None,
        prompt_lookup: dict[str, list[dict[str, Any]]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.gold = gold_config
        self.teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else teacher.tokenizer
        self.prompt_lookup = prompt_lookup or {}
        self._student_byte_lengths = np.asarray(token_byte_lengths(self.tokenizer))
        self._student_special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gold-teacher")

    # ── teacher requests ──

    def _teacher_prompt(self, prompt: str) -> tuple[Any, bool]:
        """The teacher prompt for a rollout's student prompt, and whether it fell back to the student's text."""
        if self.gold.teacher.chat_template == "student":
            return prompt, False
        messages = self.prompt_lookup.get(prompt)
        return (messages, False) if messages is not None else (prompt, True)

    def _build_rows(self, samples_list: list[Experience]) -> list[list[_Row]]:
        rows_per_experience = []
        for samples in samples_list:
            rows = []
            for b in range(samples.sequences.shape[0]):
                index, contiguous = _response_positions(samples.action_mask[b])
                response_ids = samples.sequences[b, 1:][torch.as_tensor(index, dtype=torch.long)].numpy()
                if not contiguous:
                    rows.append(
                        _Row(index, response_ids, None, problem="response is not one contiguous span")
                    )
                    continue
                prompt, fallback = self._teacher_prompt(
                    samples.prompts[b] if b < len(samples.prompts) else ""
                )
                ends_with_eos = bool(
                    response_ids.size
                    and int(response_ids[-1]) in self._student_special
                    and self._student_byte_lengths[int(response_ids[-1])] == 0
                )
                text_ids = response_ids[:-1] if ends_with_eos else response_ids
                request = TeacherRequest(
                    prompt=prompt,
                    response=text_for_teacher(self.tokenizer, text_ids),
                    ends_with_eos=ends_with_eos,
                )
                rows.append(_Row(index, response_ids, request, prompt_fallback=fallback))
            rows_per_experience.append(rows)
        return rows_per_experience

    def _score(self, requests: list[TeacherRequest]) -> tuple[list[TeacherResult], float]:
        start = time.perf_counter()
        results = list(self.teacher.score(requests)) if requests else []
        if len(results) != len(requests):
            raise RuntimeError(f"The teacher returned {len(results)} results for {len(requests)} requests.")
        return results, time.perf_counter() - start

    # ── OpenRLHF hooks ──

    @torch.no_grad()
    def make_experience(self, samples_list: list[Experience]) -> list[Experience]:
        """OpenRLHF's forwards, overlapped with teacher scoring, then the GOLD signal attached to every sample."""
        rows = self._build_rows(samples_list)
        requests = [row.request for exp_rows in rows for row in exp_rows if row.request is not None]
        future: Future = self._executor.submit(self._score, requests)

        if not self.gold.needs_reward:
            # Reward-free: OpenRLHF must neither call a reward model nor read a reward.
            for samples in samples_list:
                zeros = torch.zeros(samples.sequences.shape[0], dtype=torch.float32)
                samples.rewards = zeros
                samples.scores = zeros.clone()
                samples.info["reward"] = zeros.clone()

        experiences = super().make_experience(samples_list)
        forwards_done = time.perf_counter()
        results, teacher_seconds = future.result()
        wait_seconds = time.perf_counter() - forwards_done

        result_iter = iter(results)
        for experience, exp_rows in zip(experiences, rows):
            row_results = [next(result_iter) if row.request is not None else None for row in exp_rows]
            self._attach_signal(experience, exp_rows, row_results, teacher_seconds, wait_seconds)
        return experiences

    def _attach_signal(
        self,
        experience: Experience,
        rows: list[_Row],
        results: list[TeacherResult | None],
        teacher_seconds: float,
        wait_seconds: float,
    ) -> None:
        gold = self.gold
        batch, num_actions = experience.action_mask.shape
        alignments: list[Alignment] = []
        teacher_logprobs: list[torch.Tensor] = []
        masked_tokens = torch.zeros(batch)
        for row, result in zip(rows, results):
            num_student = row.response_ids.size
            if result is None or result.error is not None:
                reason = row.problem if result is None else f"teacher: {result.error}"
                alignments.append(Alignment.unalignable(num_student, 0, reason))
                teacher_logprobs.append(torch.zeros(0))
                continue
            alignment = align(
                self.tokenizer,
                row.response_ids,
                self.teacher_tokenizer,
                result.token_ids,
                pair_eos=gold.pair_eos,
                mode=gold.alignment,
            )
            logprobs = np.asarray(result.logprobs, dtype=np.float32)
            alignment = _mask_unscored_groups(alignment, logprobs)
            alignments.append(alignment)
            teacher_logprobs.append(torch.from_numpy(np.nan_to_num(logprobs, nan=0.0)))
            masked_tokens[len(alignments) - 1] = float(result.num_masked)

        distill = batch_distill_advantages(
            alignments,
            teacher_logprobs,
            experience.action_log_probs.float(),
            experience.action_mask,
            kl_discount=gold.kl_discount,
        )
        if gold.uses_advantages:
            experience.info[DISTILL_ADVANTAGES_KEY] = distill.advantages
        if gold.uses_logit_loss:
            self._attach_topk(experience, rows, results, alignments, distill.aligned)

        info = experience.info
        info["gold_distill_kl"] = distill.kl_sum
        info["gold_distill_kl_per_group"] = distill.kl_mean
        info["gold_aligned_token_share"] = distill.aligned_token_fraction
        info["gold_one_to_one_group_share"] = distill.one_to_one_fraction
        info["gold_unaligned"] = (~distill.aligned).float()
        info["gold_teacher_prompt_fallback"] = torch.tensor([float(r.prompt_fallback) for r in rows])
        info["gold_teacher_masked_tokens"] = masked_tokens
        info["gold_teacher_seconds"] = torch.full((batch,), teacher_seconds)
        info["gold_teacher_wait_seconds"] = torch.full((batch,), wait_seconds)
        assert distill.advantages.shape == (batch, num_actions)

    def _attach_topk(
        self,
        experience: Experience,
        rows: list[_Row],
        results: list[TeacherResult | None],
        alignments: list[Alignment],
        aligned: torch.Tensor,
    ) -> None:
        batch, num_actions = experience.action_mask.shape
        k = self.gold.teacher.topk
        ids = torch.full((batch, k, num_actions), -1, dtype=torch.int64)
        logprobs = torch.full((batch, k, num_actions), float("-inf"), dtype=torch.float32)
        mask = torch.zeros(batch, num_actions, dtype=torch.float32)
        for b, (row, result, alignment) in enumerate(zip(rows, results, alignments)):
            if not bool(aligned[b]) or result is None or result.topk_ids is None or alignment.num_groups == 0:
                continue
            student_first, teacher_first = group_starts(alignment)
            positions = torch.as_tensor(row.action_index[student_first], dtype=torch.long)
            topk_ids = torch.as_tensor(np.asarray(result.topk_ids)[teacher_first, :k], dtype=torch.int64)
            topk_lp = torch.as_tensor(
                np.asarray(result.topk_logprobs)[teacher_first, :k], dtype=torch.float32
            )
            ids[b][: topk_ids.shape[1], positions] = topk_ids.T
            logprobs[b][: topk_lp.shape[1], positions] = topk_lp.T
            mask[b, positions] = 1.0
        experience.info[TOPK_IDS_KEY] = ids
        experience.info[TOPK_LOGPROBS_KEY] = logprobs
        experience.info[LOGIT_MASK_KEY] = mask

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences: list[Experience]) -> list[Experience]:
        """OpenRLHF's advantages for its estimator, mixed with the distillation advantages by ``alpha``."""
        distill = [exp.info.pop(DISTILL_ADVANTAGES_KEY, None) for exp in experiences]
        experiences = super().compute_advantages_and_returns(experiences)
        alpha = self.gold.alpha
        for experience, distill_advantages in zip(experiences, distill):
            if distill_advantages is None:  # logit-only signal: the policy gradient sees the task reward only
                distill_advantages = torch.zeros_like(experience.advantages, dtype=torch.float32)
            experience.advantages = mix_advantages(
                experience.advantages if alpha < 1.0 else None,
                distill_advantages,
                alpha,
                self.gold.kl_coef,
            )
        return experiences
