"""The single-machine GOLD trainer: HF ``generate`` rollouts, teacher scoring, aligned signals, PPO-clip, AdamW.

One step = ``rollout_batch_size`` prompts x ``n_samples_per_prompt`` sampled responses -> teacher scores
(Ray :class:`~gold_plugin.teacher.TeacherGroup`, or an in-process scorer) -> alignment -> advantages
(distillation, task reward, or both, mixed by ``alpha``) and optionally the aligned logit loss -> clipped
policy-gradient update. Checkpoints are Hugging Face model folders plus ``trainer_state.pt`` (optimizer,
scheduler, step, RNG states), so a resumed run continues the same run.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gold_plugin.config import GoldConfig
from gold_plugin.local.config import LocalTrainConfig
from gold_plugin.local.modeling import (
    accuracy,
    encode_prompt,
    resolve_device,
    response_logits_and_logprobs,
    sample,
)

_STEP_DIR = re.compile(r"^global_step(\d+)$")


def _rewards_tensor(output: Any, count: int) -> torch.Tensor:
    values = output.get("rewards", output.get("scores")) if isinstance(output, dict) else output
    rewards = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if rewards.shape[0] != count:
        raise ValueError(f"reward_func returned {rewards.shape[0]} rewards for {count} samples.")
    return rewards


def reward_advantages(rewards: torch.Tensor, n: int, estimator: str) -> torch.Tensor:
    """Per-sample advantages from scalar rewards laid out prompt-major (``n`` samples per prompt).

    ``group_norm`` (GRPO): (r - group mean) / (group std + 1e-9); ``dr_grpo`` / ``reinforce_baseline``:
    r - group mean; ``rloo``: r - mean of the other samples; ``reinforce``: r.
    """
    grouped = rewards.reshape(-1, n)
    if estimator == "reinforce":
        out = grouped
    elif estimator in ("reinforce_baseline", "dr_grpo"):
        out = grouped - grouped.mean(dim=1, keepdim=True)
    elif estimator == "group_norm":
        std = grouped.std(dim=1, keepdim=True) if n > 1 else torch.zeros_like(grouped)
        out = (grouped - grouped.mean(dim=1, keepdim=True)) / (std + 1e-9)
    elif estimator == "rloo":
        if n < 2:
            raise ValueError("rloo needs --rollout.n_samples_per_prompt >= 2.")
        out = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (n - 1)
    else:
        raise ValueError(
            f"--algo.advantage.estimator {estimator!r} is not supported by the local backend: use group_norm, "
            "dr_grpo, reinforce_baseline, rloo or reinforce."
        )
    return out.reshape(-1)


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
    """GOLD on one machine. ``teacher`` is any object with ``score(list[TeacherRequest])`` and ``tokenizer``
    (an in-process :class:`~gold_plugin.teacher.HFTeacher`) or a Ray ``TeacherGroup`` plus ``teacher_tokenizer``.
    """

    def __init__(
        self,
        config: LocalTrainConfig,
        gold: GoldConfig,
        teacher: Any,
        teacher_tokenizer: Any,
        *,
        eval_check: Callable[[str, str], bool] | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gold_plugin.alignment import VocabMap

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
        self.vocab_map = VocabMap(self.tokenizer, teacher_tokenizer) if gold.uses_logit_loss else None
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
        self.history: list[dict[str, float]] = []
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
    def _score_teacher(self, rows: list[dict], responses: list[str], ends: list[bool]) -> list[Any]:
        from gold_plugin.teacher import TeacherRequest

        use_raw = self.gold.teacher.chat_template == "teacher" and self.config.apply_chat_template
        requests = [
            TeacherRequest(
                self._prompt_text(row) if use_raw else self._student_prompt(row), response, ends_with_eos=end
            )
            for row, response, end in zip(rows, responses, ends)
        ]
        return self.teacher.score(requests)

    def train_step(self) -> dict[str, float]:
        """Sample, score, update once; returns the step's metrics."""
        from gold_plugin.alignment import align_batch, text_for_teacher

        c, gold = self.config, self.gold
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        rows = self.batch_rows(self.step)
        prompt_ids = [encode_prompt(self.tokenizer, self._student_prompt(r)) for r in rows]
        rollout = sample(
            self.model,
            self.tokenizer,
            prompt_ids,
            n_samples_per_prompt=c.n_samples_per_prompt,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
        )
        sample_rows = [rows[i] for i in rollout.prompt_index]
        text_ids = [r[:-1] if end else r for r, end in zip(rollout.response_ids, rollout.ends_with_eos)]
        responses = [text_for_teacher(self.tokenizer, ids) for ids in text_ids]
        timings["time/generate"] = time.perf_counter() - t0

        metrics: dict[str, float] = {}
        needs_teacher = gold.alpha > 0
        alignments, results = None, None
        if needs_teacher:
            t1 = time.perf_counter()
            results = self._score_teacher(sample_rows, responses, rollout.ends_with_eos)
            timings["time/teacher"] = time.perf_counter() - t1
            failed = [r.error is not None for r in results]
            alignments = align_batch(
                self.tokenizer,
                rollout.response_ids,
                self.teacher_tokenizer,
                [r.token_ids for r in results],
                pair_eos=gold.pair_eos,
                mode=gold.alignment,
            )
            metrics["gold/teacher_failed"] = float(sum(failed))
            metrics["gold/teacher_masked_tokens"] = float(sum(r.num_masked for r in results))

        rewards = None
        if c.reward_func is not None:
            queries = [self._student_prompt(r) + resp for r, resp in zip(sample_rows, responses)]
            prompts = [self._student_prompt(r) for r in sample_rows]
            labels = [str(r.get(c.label_key, "")) if c.label_key else "" for r in sample_rows]
            rewards = _rewards_tensor(c.reward_func(queries, prompts, labels), len(queries))
            metrics["reward/mean"] = float(rewards.mean())

        # Old log-probs (the sampling policy), then the advantages of the whole rollout.
        num_samples = len(rollout.response_ids)
        with torch.no_grad():
            old, mask = self._logprobs_in_chunks(rollout)
        advantages, adv_metrics = self._advantages(rollout, alignments, results, rewards, old, mask)
        metrics.update(adv_metrics)

        t2 = time.perf_counter()
        train_batch = min(c.train_batch_size or num_samples, num_samples)
        self.model.train()
        stats: dict[str, list[float]] = {}
        for _epoch in range(c.max_epochs):
            for start in range(0, num_samples, train_batch):
                batch = list(range(start, min(start + train_batch, num_samples)))
                batch_tokens = max(float(mask[batch].sum()), 1.0)
                self.optimizer.zero_grad(set_to_none=True)
                for micro_start in range(0, len(batch), c.micro_batch_size):
                    micro = batch[micro_start : micro_start + c.micro_batch_size]
                    part = self._micro_step(
                        micro, batch_tokens, rollout, alignments, results, old, advantages
                    )
                    for key, value in part.items():
                        stats.setdefault(key, []).append(value)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_norm)
                stats.setdefault("train/grad_norm", []).append(float(grad_norm))
                self.optimizer.step()
        self.scheduler.step()
        timings["time/train"] = time.perf_counter() - t2
        self.step += 1
        metrics.update(
            {k: float(np.sum(v)) if k == "train/policy_loss" else float(np.mean(v)) for k, v in stats.items()}
        )
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["rollout/response_length"] = float(np.mean([len(r) for r in rollout.response_ids]))
        metrics["rollout/ends_with_eos"] = float(np.mean(rollout.ends_with_eos))
        metrics.update(timings)
        return metrics

    def _logprobs_in_chunks(self, rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the sampled tokens ``[N, A]`` (0 outside responses) and the action mask ``[N, A]``."""
        n = len(rollout.response_ids)
        width = max(max((len(r) for r in rollout.response_ids), default=0), 1)
        logprobs = torch.zeros(n, width, device=self.device)
        mask = torch.zeros(n, width, dtype=torch.bool, device=self.device)
        for start in range(0, n, self.config.micro_batch_size):
            sl = slice(start, start + self.config.micro_batch_size)
            _, lp, m = response_logits_and_logprobs(
                self.model,
                rollout.prompt_ids[sl],
                rollout.response_ids[sl],
                self.tokenizer.pad_token_id,
                temperature=self.config.temperature,
            )
            logprobs[sl, : lp.shape[1]] = lp
            mask[sl, : m.shape[1]] = m
        return logprobs, mask

    def _advantages(
        self,
        rollout,
        alignments,
        results,
        rewards: torch.Tensor | None,
        old: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``A = (1-alpha) A_reward + alpha kl_coef norm(A_distill)`` for the rollout, ``[N, A]``.

        The distillation advantages are normalised over the rollout's action tokens as OpenRLHF normalises
        reinforce-type advantages (mean removed, divided by the std unless ``no_std_norm``; ``advantage_norm``
        ``none`` keeps the raw ``-d_g``): without a baseline every sampled token is pushed down, and a small model
        drifts to tokens the teacher cannot score.
        """
        from gold_plugin.signals import batch_distill_advantages, mix_advantages

        c, gold = self.config, self.gold
        metrics: dict[str, float] = {}
        distill = None
        if alignments is not None:
            teacher_lp = [torch.tensor(r.logprobs) for r in results]  # copies: results are read-only arrays
            adv = batch_distill_advantages(alignments, teacher_lp, old, mask, gold.kl_discount)
            metrics.update(adv.metrics())
            distill = adv.advantages if gold.uses_advantages else torch.zeros_like(old)
            if gold.uses_advantages and c.advantage_norm != "none":
                signal = mask & (distill != 0)
                count = max(int(signal.sum()), 1)
                mean = distill[signal].sum() / count
                distill = torch.where(signal, distill - mean, torch.zeros_like(distill))
                if c.advantage_norm == "whiten" and count > 1:
                    distill = distill * (distill[signal].pow(2).mean().clamp(min=1e-8).rsqrt())
        reward_adv = None
        if gold.needs_reward and rewards is not None:
            per_sample = reward_advantages(rewards, c.n_samples_per_prompt, c.advantage_estimator)
            reward_adv = per_sample[:, None].to(old.device) * mask
        mixed = mix_advantages(reward_adv, distill, gold.alpha, gold.kl_coef, mask)
        return mixed.detach(), metrics

    def _micro_step(
        self,
        micro: list[int],
        batch_tokens: float,
        rollout,
        alignments,
        results,
        old_all: torch.Tensor,
        advantages_all: torch.Tensor,
    ) -> dict[str, float]:
        """Forward, clipped policy loss (+ aligned logit loss), backward; gradients accumulate."""
        from gold_plugin.signals import aligned_logit_loss, logit_loss_inputs, per_sample_mean

        c, gold = self.config, self.gold
        logits, logprobs, mask = response_logits_and_logprobs(
            self.model,
            [rollout.prompt_ids[i] for i in micro],
            [rollout.response_ids[i] for i in micro],
            self.tokenizer.pad_token_id,
            temperature=c.temperature,
        )
        width = logprobs.shape[1]
        old = old_all[micro, :width]
        advantages = advantages_all[micro, :width]
        ratio = torch.exp(logprobs - old)
        clipped = torch.clamp(ratio, 1.0 - c.eps_clip, 1.0 + c.eps_clip)
        token_loss = -torch.minimum(ratio * advantages, clipped * advantages)
        # Token-mean over the optimizer batch: micro-batches add up to the loss of one big batch.
        policy_loss = (token_loss * mask).sum() / batch_tokens
        loss = policy_loss
        metrics = {"train/policy_loss": float(policy_loss.detach())}
        if gold.uses_logit_loss and alignments is not None and gold.alpha > 0:
            inputs = logit_loss_inputs(
                [alignments[i] for i in micro],
                [results[i].topk_ids for i in micro],
                [results[i].topk_logprobs for i in micro],
                mask,
            )
            if inputs.positions.shape[0]:
                out = aligned_logit_loss(
                    logits,
                    inputs.teacher_topk_ids,
                    inputs.teacher_topk_logprobs,
                    self.vocab_map.teacher_to_student if gold.alignment == "spans" else None,
                    config=gold,
                    positions=inputs.positions,
                )
                logit_loss = per_sample_mean(out.loss, inputs.sample_index, len(micro)).mean()
                share = float(mask.sum()) / batch_tokens
                loss = loss + gold.alpha * gold.logit_coef * logit_loss * share
                metrics["gold/logit_loss"] = float(logit_loss.detach())
        loss.backward()
        return metrics

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
        print(f"Resumed from {folder} at step {self.step}.")

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
