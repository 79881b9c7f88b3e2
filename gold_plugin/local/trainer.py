"""The single-machine GOLD trainer: HF ``generate`` rollouts, teacher scoring, aligned signals, PPO-clip, AdamW.

One step = ``rollout_batch_size`` prompts x ``n_samples_per_prompt`` responses (student samples; with
``--gold.lmbda < 1`` a drawn share of the prompts uses the dataset's reference completion instead) -> teacher
scores (Ray :class:`~gold_plugin.teacher.TeacherGroup`, or an in-process scorer) -> the GOLD step of
:mod:`gold_plugin.step` (alignment, advantages mixed by ``alpha``, logit-loss inputs, metrics: the same functions
the OpenRLHF backend calls) -> clipped policy-gradient update (:func:`~gold_plugin.signals.clipped_policy_loss`)
plus the logit-loss term. Checkpoints are Hugging Face model folders plus ``trainer_state.pt`` (optimizer,
scheduler, step, RNG states), so a resumed run continues the same run.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gold_plugin.config import GoldConfig
from gold_plugin.local.config import LocalTrainConfig
from gold_plugin.local.modeling import (
    ResponseForward,
    Rollout,
    accuracy,
    encode_prompt,
    resolve_device,
    response_forward,
    sample,
)
from gold_plugin.signals.estimators import reward_advantages
from gold_plugin.signals.policy_loss import clipped_policy_loss
from gold_plugin.signals.positions import PositionBatch
from gold_plugin.step import (
    AlignedBatch,
    LogitVocab,
    NoSignalWatch,
    StudentForward,
    align_results,
    chat_messages,
    distill_advantages,
    draw_off_policy,
    gold_advantages,
    loss_signals,
    mean_metrics,
    off_policy_metrics,
    off_policy_responses,
    per_unit_means,
    reference_text,
    response_ends_with_eos,
    sample_metrics,
    student_layers,
    teacher_completion_call,
    teacher_prompt,
    teacher_requests,
)
from gold_plugin.teacher.generation import generate_counting_retries
from gold_plugin.teacher.types import TeacherScorer

if TYPE_CHECKING:
    from gold_plugin.alignment.types import Tokenizer

_STEP_DIR = re.compile(r"^global_step(\d+)$")


@dataclass
class LocalExperience:
    """One step's rollout with what the update needs (the local counterpart of OpenRLHF's experiences)."""

    rollout: Rollout
    off_policy: torch.Tensor
    """[N] bool: the sample is the dataset's reference completion (no policy gradient; logit loss only)."""
    aligned: AlignedBatch | None
    """Teacher results aligned to the responses (None when ``alpha == 0``: no teacher)."""
    prepared: dict[str, PositionBatch]
    """Per loss signal (by name): its inputs, built once for all the step's samples (:meth:`LossSignal.prepare`),
    on the training device; each micro-batch takes its samples' positions
    (:meth:`~gold_plugin.signals.positions.PositionBatch.select`). Empty without a teacher."""
    old_logprobs: torch.Tensor
    """[N, A] log-probs of the responses under the sampling policy."""
    mask: torch.Tensor
    """[N, A] bool action mask."""
    advantages: torch.Tensor
    """[N, A] the advantages of :func:`gold_plugin.step.gold_advantages`."""
    signal: torch.Tensor
    """[N, A] bool: the tokens that carry a distillation signal (in a group the teacher scored)."""
    metrics: dict[str, float]


def _rewards_tensor(output: Any, count: int) -> torch.Tensor:
    values = output.get("rewards", output.get("scores")) if isinstance(output, dict) else output
    rewards = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if rewards.shape[0] != count:
        raise ValueError(f"reward_func returned {rewards.shape[0]} rewards for {count} samples.")
    return rewards


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The ``global_step<N>`` folder with the largest N that holds a complete checkpoint, or None."""
    if not ckpt_path or not os.path.isdir(ckpt_path):
        return None
    steps = []
    for entry in Path(ckpt_path).iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / "trainer_state.pt").exists():
            steps.append((int(match.group(1)), entry))
    return max(steps)[1] if steps else None


class LocalTrainer:
    """GOLD on one machine. ``teacher`` is a :class:`~gold_plugin.teacher.TeacherScorer` (an in-process
    :class:`~gold_plugin.teacher.HFTeacher` or a Ray ``TeacherGroup``; None only with ``alpha == 0``) and
    ``teacher_tokenizer`` the tokenizer its token ids refer to.
    """

    def __init__(
        self,
        config: LocalTrainConfig,
        gold: GoldConfig,
        teacher: TeacherScorer | None,
        teacher_tokenizer: Tokenizer,
        *,
        eval_check: Callable[[str, str], bool] | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if teacher is None and gold.alpha > 0:
            raise ValueError(f"--gold.alpha {gold.alpha} needs a teacher; give one, or set --gold.alpha 0.")
        self.config, self.gold, self.teacher = config, gold, teacher
        self.teacher_tokenizer = teacher_tokenizer
        self.device = resolve_device(config.device)
        config.check_gold(gold)  # reward, reference completions: GoldConfigError naming the option
        self.eval_check = eval_check
        start = latest_checkpoint(config.ckpt_path) if config.load_checkpoint else None
        source = str(start) if start is not None else config.student
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(self.device)
        vocab = LogitVocab.build(self.tokenizer, teacher_tokenizer, gold)
        self.losses = {
            name: signal.to(self.device)
            for name, signal in loss_signals(gold, vocab, self.model.config.num_hidden_layers).items()
        }
        """The run's loss signals (:func:`~gold_plugin.step.loss_signals`), on the training device."""
        self.student_layers = student_layers(self.losses)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.learning_rate,
            betas=tuple(config.adam_betas),
            weight_decay=config.weight_decay,
        )
        self.total_steps = self._total_steps()
        warmup = math.ceil(config.lr_warmup_ratio * self.total_steps)

        def schedule(step: int) -> float:  # OpenRLHF's cosine_with_min_lr
            if step < warmup:
                return (step + 1) / max(warmup, 1)
            progress = (step - warmup) / max(self.total_steps - warmup, 1)
            cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
            return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        self.rollout_metrics: dict[str, float] = {}
        """The last rollout's teacher-generation time and retries (with --gold.off_policy_source teacher)."""
        self.history: list[dict[str, float]] = []
        self.no_signal = NoSignalWatch(gold.max_steps_without_signal)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        if start is not None:
            self._load_state(start)
        self._writer = None
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(config.tensorboard_dir)

    # -- data ---------------------------------------------------------------------------------------
    def _total_steps(self) -> int:
        c = self.config
        if c.max_steps is not None:
            return int(c.max_steps)
        return max(1, c.num_episodes * (len(c.prompts) // c.rollout_batch_size))

    def _prompt_text(self, row: dict) -> str | list[dict]:
        value = row[self.config.input_key]
        if self.config.apply_chat_template:
            messages = value if isinstance(value, list) else [{"role": "user", "content": value}]
            return messages
        return value

    def _student_prompt(self, row: dict) -> str:
        prompt = self._prompt_text(row)
        if isinstance(prompt, list):
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return prompt

    def batch_rows(self, step: int) -> list[dict]:
        """The prompts of ``step``: a seeded permutation per pass over the data, so a resumed run sees the same."""
        c = self.config
        per_epoch = max(len(c.prompts) // c.rollout_batch_size, 1)
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng(c.seed + epoch).permutation(len(c.prompts))
        picked = order[index * c.rollout_batch_size : (index + 1) * c.rollout_batch_size]
        return [c.prompts[i] for i in picked]

    # -- one step -----------------------------------------------------------------------------------
    def _teacher_prompt(self, row: dict) -> tuple[str | list[dict], bool]:
        """The teacher's prompt for ``row`` and whether it fell back (:func:`gold_plugin.step.teacher_prompt`)."""
        return teacher_prompt(
            self._student_prompt(row),
            chat_messages(row.get(self.config.input_key)),
            self.gold,
            self.config.apply_chat_template,
        )

    def _reference(self, row: dict) -> str | None:
        key = self.config.output_key
        return reference_text(row.get(key)) if key else None

    def make_rollout(self, rows: list[dict], step: int) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        """The step's responses, prompt-major: student samples, except for the prompts drawn off-policy
        (``1 - lmbda`` of them), whose ``n`` samples are one off-policy completion: the dataset's reference or the
        teacher's (``--gold.off_policy_source``; ``rollout.teacher_written`` marks those).

        Returns the rollout and, per sample, ``off_policy`` and ``missing_reference`` (drawn but without a
        completion: trained on-policy).
        """
        c, gold = self.config, self.gold
        n = c.n_samples_per_prompt
        prompt_ids = [encode_prompt(self.tokenizer, self._student_prompt(r)) for r in rows]
        references = [self._reference(r) for r in rows]
        draw = draw_off_policy(references, gold, c.seed, step, [self._student_prompt(r) for r in rows])
        call = teacher_completion_call(
            draw,
            [self._teacher_prompt(r)[0] if draw.teacher[i] else None for i, r in enumerate(rows)],
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=c.seed,
            step=step,
        )
        start = time.perf_counter()
        generations, retries = (
            generate_counting_retries(self.teacher, call.prompts, call.params) if call.params else ([], 0)
        )
        self.rollout_metrics = (
            {
                "gold/teacher_generation_seconds": time.perf_counter() - start,
                "gold/teacher_generation_retries": float(retries),
            }
            if gold.teacher_generates
            else {}
        )
        completions = off_policy_responses(
            self.tokenizer, draw, references, call, generations, max_new_tokens=c.max_new_tokens
        )
        off, missing, by_teacher = (
            completions.draw.off_policy,
            completions.draw.missing_reference,
            completions.draw.teacher,
        )
        on_index = [i for i in range(len(rows)) if not off[i]]
        sampled = sample(
            self.model,
            self.tokenizer,
            [prompt_ids[i] for i in on_index],
            n_samples_per_prompt=n,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
        )
        per_prompt: dict[int, list[list[int]]] = {i: [] for i in range(len(rows))}
        for j, response in enumerate(sampled.response_ids):
            per_prompt[on_index[sampled.prompt_index[j]]].append(response)
        for i in range(len(rows)):
            if off[i]:
                per_prompt[i] = [list(completions.response_ids[i]) for _ in range(n)]
        rollout = Rollout([], [], [], [])
        for i in range(len(rows)):
            for response in per_prompt[i]:
                rollout.prompt_index.append(i)
                rollout.prompt_ids.append(prompt_ids[i])
                rollout.response_ids.append(response)
                rollout.ends_with_eos.append(response_ends_with_eos(self.tokenizer, response))
                rollout.teacher_written.append(bool(by_teacher[i]))
        index = np.asarray(rollout.prompt_index, dtype=np.int64)
        return rollout, torch.from_numpy(off[index]), torch.from_numpy(missing[index])

    def make_experience(
        self,
        rows: list[dict],
        rollout: Rollout,
        off_policy: torch.Tensor | None = None,
        missing_reference: torch.Tensor | None = None,
    ) -> LocalExperience:
        """Teacher scores, alignments, rewards, old log-probs and advantages of a rollout (no update).

        Every GOLD computation is :mod:`gold_plugin.step`'s, as in the OpenRLHF backend.
        """
        c, gold = self.config, self.gold
        num_samples = len(rollout.response_ids)
        off = torch.zeros(num_samples, dtype=torch.bool) if off_policy is None else off_policy.to(torch.bool)
        missing = (
            torch.zeros(num_samples, dtype=torch.bool) if missing_reference is None else missing_reference
        )
        by_teacher = torch.zeros(num_samples, dtype=torch.bool)
        if rollout.teacher_written:
            by_teacher = torch.tensor(rollout.teacher_written, dtype=torch.bool) & off
        sample_rows = [rows[i] for i in rollout.prompt_index]
        prompts, fallback = zip(*(self._teacher_prompt(r) for r in sample_rows)) if sample_rows else ((), ())
        requests = teacher_requests(self.tokenizer, rollout.response_ids, list(prompts))
        metrics: dict[str, float] = {}
        aligned = None
        if gold.alpha > 0:
            t1 = time.perf_counter()
            assert self.teacher is not None  # checked in __init__: alpha > 0 has a teacher
            results, retries = self.teacher.score_counting_retries(requests)
            metrics["gold/teacher_seconds"] = time.perf_counter() - t1
            metrics["gold/teacher_retries"] = float(
                retries
            )  # parts of the call re-sent (score_counting_retries)
            if len(results) != len(requests):
                raise RuntimeError(
                    f"The teacher returned {len(results)} results for {len(requests)} requests."
                )
            aligned = align_results(
                self.tokenizer, self.teacher_tokenizer, rollout.response_ids, results, gold
            )

        rewards = None
        if c.reward_func is not None:
            prompts = [self._student_prompt(r) for r in sample_rows]
            queries = [p + req.response for p, req in zip(prompts, requests)]
            labels = [str(r.get(c.label_key, "")) if c.label_key else "" for r in sample_rows]
            rewards = _rewards_tensor(c.reward_func(queries, prompts, labels), len(queries))
            metrics["reward/mean"] = float(rewards.mean())

        with torch.no_grad():
            old, mask = self._logprobs_in_chunks(rollout)
        if aligned is not None:
            distill, signal = distill_advantages(aligned, old, mask, gold)
            fell_back = torch.tensor(fallback, dtype=torch.float32)
            metrics.update(
                mean_metrics(sample_metrics(aligned, distill, off, missing, fell_back, by_teacher))
            )
            distill_adv = distill.advantages
        else:
            distill_adv, signal = torch.zeros_like(old), torch.zeros_like(mask)
            metrics.update(mean_metrics(off_policy_metrics(off, missing, by_teacher)))
        reward_adv = None
        if gold.needs_reward and rewards is not None:
            per_sample = reward_advantages(rewards, c.n_samples_per_prompt, c.advantage_estimator)
            reward_adv = per_sample[:, None].to(old.device) * mask
        [advantages] = gold_advantages([reward_adv], [distill_adv], [signal], [off], gold)
        prepared: dict[str, PositionBatch] = {}
        if aligned is not None:
            for name, loss in self.losses.items():
                batch, part = loss.prepare(aligned, rollout.response_ids, mask.cpu())
                prepared[name] = batch.to(self.device)
                metrics.update(mean_metrics(part))
        return LocalExperience(
            rollout=rollout,
            off_policy=off,
            aligned=aligned,
            prepared=prepared,
            old_logprobs=old,
            mask=mask,
            advantages=advantages.detach(),
            signal=signal,
            metrics=metrics,
        )

    def train_step(self) -> dict[str, float]:
        """Sample, score, update once; returns the step's metrics."""
        c = self.config
        t0 = time.perf_counter()
        rows = self.batch_rows(self.step)
        rollout, off, missing = self.make_rollout(rows, self.step)
        generate_seconds = time.perf_counter() - t0
        experience = self.make_experience(rows, rollout, off, missing)
        if experience.aligned is not None:
            message = self.no_signal.observe(self.step + 1, [(experience.aligned, experience.signal)])
            if message is not None:
                from tqdm.auto import tqdm

                tqdm.write(f"WARNING: {message}", file=sys.stderr)
        metrics = {**experience.metrics, **self.rollout_metrics}

        t2 = time.perf_counter()
        num_samples = len(rollout.response_ids)
        metrics.update(self.fit_signals(experience))
        train_batch = min(c.train_batch_size or num_samples, num_samples)
        self.model.train()
        stats: dict[str, list[float]] = {}
        per_sample: dict[str, list[tuple[float, int]]] = {}  # the GOLD metrics: (value, micro-batch size)
        for _epoch in range(c.max_epochs):
            for start in range(0, num_samples, train_batch):
                batch = list(range(start, min(start + train_batch, num_samples)))
                batch_tokens = max(float(experience.mask[batch].sum()), 1.0)
                normalisers = self._normalisers(experience, batch, batch_tokens)
                self.optimizer.zero_grad(set_to_none=True)
                for micro_start in range(0, len(batch), c.micro_batch_size):
                    micro = batch[micro_start : micro_start + c.micro_batch_size]
                    loss, part = self.micro_batch_loss(experience, micro, batch_tokens, normalisers)
                    loss.backward()
                    stats.setdefault("train/policy_loss", []).append(part.pop("train/policy_loss"))
                    for key, value in part.items():
                        per_sample.setdefault(key, []).append((value, len(micro)))
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_norm)
                stats.setdefault("train/grad_norm", []).append(float(grad_norm))
                self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics.update(
            {k: float(np.sum(v)) if k == "train/policy_loss" else float(np.mean(v)) for k, v in stats.items()}
        )
        # Sample-weighted, as OpenRLHF reduces them: per-position means over the step, whatever the micro-batches.
        for key, pairs in per_sample.items():
            metrics[key] = sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1)
        metrics = per_unit_means(metrics)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["rollout/response_length"] = float(np.mean([len(r) for r in rollout.response_ids]))
        metrics["rollout/ends_with_eos"] = float(np.mean(rollout.ends_with_eos))
        metrics["time/generate"] = generate_seconds
        metrics["time/train"] = time.perf_counter() - t2
        return metrics

    def _logprobs_in_chunks(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the sampled tokens ``[N, A]`` (0 outside responses) and the action mask ``[N, A]``."""
        n = len(rollout.response_ids)
        width = max(max((len(r) for r in rollout.response_ids), default=0), 1)
        logprobs = torch.zeros(n, width, device=self.device)
        mask = torch.zeros(n, width, dtype=torch.bool, device=self.device)
        for start in range(0, n, self.config.micro_batch_size):
            sl = slice(start, start + self.config.micro_batch_size)
            out = response_forward(
                self.model,
                rollout.prompt_ids[sl],
                rollout.response_ids[sl],
                self.tokenizer.pad_token_id,
                temperature=self.config.temperature,
            )
            lp, m = out.logprobs, out.action_mask
            logprobs[sl, : lp.shape[1]] = lp
            mask[sl, : m.shape[1]] = m
        return logprobs, mask

    def fit_signals(self, experience: LocalExperience) -> dict[str, float]:
        """Fit the signals that need it (the hidden-state bridge: at the first step, or every step to refit) on this
        step's samples, before its update; their metrics."""
        metrics: dict[str, float] = {}
        for name, signal in self.losses.items():
            if signal.needs_fit and name in experience.prepared:
                metrics.update(signal.fit(self._no_grad_forwards(experience, name)))
        return metrics

    def _no_grad_forwards(
        self, experience: LocalExperience, name: str
    ) -> Iterator[tuple[StudentForward, PositionBatch]]:
        """The step's micro-batches: a no-grad forward each, with signal ``name``'s inputs."""
        count = len(experience.rollout.response_ids)
        for start in range(0, count, self.config.micro_batch_size):
            micro = list(range(start, min(start + self.config.micro_batch_size, count)))
            with torch.no_grad():
                forward = self._student_forward(self._forward(experience.rollout, micro))
            yield forward, experience.prepared[name].select(micro)

    def _forward(self, rollout: Rollout, micro: list[int]) -> ResponseForward:
        return response_forward(
            self.model,
            [rollout.prompt_ids[i] for i in micro],
            [rollout.response_ids[i] for i in micro],
            self.tokenizer.pad_token_id,
            temperature=self.config.temperature,
            hidden_layers=self.student_layers,
        )

    def _student_forward(self, forward: ResponseForward) -> StudentForward:
        """What the loss signals read of a forward: the action logits (offset 0), divided by the rollout
        temperature like the policy's log-probs, and the states at the action tokens."""
        return StudentForward(
            logits=forward.action_logits,
            logits_temperature=self.config.temperature,
            states=forward.hidden_states,
            layers=self.student_layers,
        )

    def _normalisers(self, experience: LocalExperience, rows: list[int], tokens: float) -> dict[str, float]:
        """Per loss signal, the count of its unit in the optimiser batch ``rows``: its ``tokens`` action tokens, or
        the signal's own positions there."""
        return {
            name: tokens
            if self.losses[name].unit == "action_tokens"
            else float(prepared.select(rows).num_positions)
            for name, prepared in experience.prepared.items()
        }

    def micro_batch_loss(
        self,
        experience: LocalExperience,
        micro: list[int],
        batch_tokens: float,
        normalisers: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward of samples ``micro``; the clipped policy loss, a token mean over the optimiser batch's
        ``batch_tokens`` action tokens (micro-batches add up to one batch's loss), plus every loss signal's term over
        its ``normalisers[name]`` (the optimiser batch's count of the signal's unit; None: ``micro`` is the batch)."""
        c = self.config
        rollout = experience.rollout
        forward = self._forward(rollout, micro)
        logprobs, mask = forward.logprobs, forward.action_mask
        width = logprobs.shape[1]
        policy_loss = clipped_policy_loss(
            logprobs,
            experience.old_logprobs[micro, :width],
            experience.advantages[micro, :width],
            mask,
            c.eps_clip,
            batch_tokens,
        )
        loss = policy_loss
        metrics = {"train/policy_loss": float(policy_loss.detach())}
        student = self._student_forward(forward)
        if normalisers is None:
            normalisers = self._normalisers(experience, micro, batch_tokens)
        for name, prepared in experience.prepared.items():
            term, part = self.losses[name].term(
                student, prepared.select(micro), normalisers[name], len(micro)
            )
            loss = loss + term
            metrics.update({k: float(v) for k, v in part.items()})
        return loss, metrics

    # -- evaluation, checkpoints, logging --------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the eval prompts (``eval_check`` or the reward function > 0.5)."""
        c = self.config
        if not c.eval_prompts or (self.eval_check is None and c.reward_func is None):
            return {}
        check = self.eval_check
        if check is None:

            def check(response: str, label: str) -> bool:
                return float(_rewards_tensor(c.reward_func([response], [""], [label]), 1)[0]) > 0.5

        rows = [
            {"input": self._student_prompt(r), "label": str(r.get(c.label_key, "")) if c.label_key else ""}
            for r in c.eval_prompts
        ]
        acc = accuracy(
            self.model, self.tokenizer, rows, check, max_new_tokens=c.eval_max_new_tokens or c.max_new_tokens
        )
        return {"eval/accuracy": acc}

    def save_checkpoint(self) -> Path:
        """``<ckpt.path>/global_step<N>/``: HF model + tokenizer + ``trainer_state.pt``; keeps ``max_num``."""
        root = Path(self.config.ckpt_path or "ckpt")
        target = root / f"global_step{self.step}"
        tmp = root / f".global_step{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        torch.save(
            {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
                "gold": self.gold.to_dict(),
                "history": self.history,
                "signals": {name: signal.state_dict() for name, signal in self.losses.items()},
            },
            tmp / "trainer_state.pt",
        )
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        kept = sorted(
            (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) is not None
        )
        for _, old in kept[: max(len(kept) - self.config.max_ckpt_num, 0)]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def _load_state(self, folder: Path) -> None:
        state = torch.load(folder / "trainer_state.pt", weights_only=False, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        _set_rng_state(state["rng"])
        saved = state.get("signals", {})
        for name, signal in self.losses.items():
            signal.load_state_dict(saved.get(name, {}), self.device)
        print(f"Resumed from {folder} at step {self.step}.")
        changed = self.gold.changes_from(state.get("gold", {}))
        if changed:
            print(
                f"WARNING: GOLD options differ from the checkpoint's ({folder}); the run goes on with the new ones: "
                + "; ".join(changed),
                file=sys.stderr,
            )

    def _log(self, metrics: dict[str, float]) -> None:
        record = {"step": self.step, **metrics}
        self.history.append(record)
        if self.config.metrics_path:
            Path(self.config.metrics_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.config.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, self.step)

    def fit(self, on_eval: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Train until ``total_steps``; evaluates at step 0 (fresh runs), every ``eval_steps`` and at the end."""
        from tqdm.auto import tqdm

        c = self.config
        if self.step == 0 and c.eval_steps != 0:
            metrics = self.evaluate()
            if metrics:
                self._log(metrics)
                if on_eval:
                    on_eval(self.step, metrics)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not c.progress, desc="gold local")
        while self.step < self.total_steps:
            metrics = self.train_step()
            if c.eval_steps > 0 and (self.step % c.eval_steps == 0 or self.step == self.total_steps):
                evaluated = self.evaluate()
                metrics.update(evaluated)
                if on_eval and evaluated:
                    on_eval(self.step, evaluated)
            if self.step % max(c.logging_steps, 1) == 0 or "eval/accuracy" in metrics:
                self._log(metrics)
            bar.update(1)
            bar.set_postfix(
                {k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items() if k in _SHOWN}, refresh=False
            )
            if c.ckpt_path and c.save_steps > 0 and self.step % c.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        if c.output_dir:
            self.model.save_pretrained(c.output_dir)
            self.tokenizer.save_pretrained(c.output_dir)
        if self._writer is not None:
            self._writer.close()
        return self.history


_SHOWN = ("gold/sampled_kl", "reward/mean", "eval/accuracy", "gold/logit_loss")
