"""What GOLD sees on the pretrained pair: SmolLM2-135M-Instruct (student) sampling German translations, Gemma-3-270M
(base, with the Gemma 3 chat template) scoring them.

Two measurements, both on the local backend's own code:

- ``steps``: two GOLD steps per signal (byte projection, vocabulary-map hybrid, sampled-KL advantages) from the same
  start: the step's alignment and loss metrics and its time split (sampling, teacher, update);
- ``topk``: the teacher's probability mass outside its top-k (k = 1 ... 1024) at every response position of the
  student's samples: what the byte projection's remainder bucket and GOLD's hybrid cannot see at a given
  ``--gold.teacher.topk``.

    .venv/bin/python examples/local/pretrained_pair_probe.py [--parts steps topk] [--threads 1]

The pair is prepared on first use (``python -m gold_plugin.pretrained``). Quality (held-out accuracy over training)
is not measured here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gold_plugin.pretrained import (
    TRANSLATION_WORDS,
    local_pair_options,
    translation_messages,
    write_translation_prompts,
)

SIGNALS = {
    "byte projection": ["--gold.signal", "logit"],
    "vocabulary-map hybrid": ["--gold.signal", "logit", "--gold.logit_projection", "vocab"],
    "sampled-KL advantages": ["--gold.signal", "advantage"],
}
SHOWN = (
    "gold/aligned_token_share",
    "gold/one_to_one_group_share",
    "gold/unaligned",
    "gold/sampled_kl",
    "gold/logit_positions",
    "gold/logit_loss",
    "gold/projection_remainder",
    "time/generate",
    "gold/teacher_seconds",
    "time/train",
)


def gold_steps(pair, work: Path, steps: int = 2) -> None:
    from gold_plugin.local.cli import build_parser
    from gold_plugin.local.config import configs_from_args
    from gold_plugin.local.trainer import LocalTrainer
    from gold_plugin.teacher import build_teacher
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    data = write_translation_prompts(work / "prompts.jsonl")
    print("| signal | step | " + " | ".join(SHOWN) + " | step wall (s) |")
    print("|---" * (len(SHOWN) + 3) + "|")
    for name, options in SIGNALS.items():
        argv = [
            *local_pair_options(pair, data),
            "--rollout.batch_size", "4", "--rollout.n_samples_per_prompt", "4", "--rollout.max_new_tokens", "16",
            "--actor.adam.lr", "1e-5", "--actor.lr_warmup_ratio", "0", "--actor.min_lr_ratio", "1",
            "--local.teacher_in_process", "--local.max_steps", str(steps), "--eval.steps", "0", "--local.no_progress",
            "--ckpt.path", str(work / "ckpt"), *options,
        ]  # fmt: skip
        config, gold = configs_from_args(build_parser().parse_args(argv))
        teacher = build_teacher(gold.teacher, device="cpu")
        trainer = LocalTrainer(config, gold, teacher, load_teacher_tokenizer(gold.teacher))
        for step in range(1, steps + 1):
            start = time.perf_counter()
            metrics = trainer.train_step()
            wall = time.perf_counter() - start
            cells = [f"{metrics[k]:.3g}" if k in metrics else "-" for k in SHOWN]
            print(f"| {name} | {step} | " + " | ".join(cells) + f" | {wall:.1f} |", flush=True)


def teacher_mass_outside_topk(pair, ks=(1, 8, 64, 256, 1024), samples_per_prompt: int = 2) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gold_plugin.teacher import TeacherRequest
    from gold_plugin.teacher.prepare import RequestEncoder

    torch.manual_seed(0)
    student_tok = AutoTokenizer.from_pretrained(pair.student)
    student = AutoModelForCausalLM.from_pretrained(pair.student)
    chat = AutoTokenizer.from_pretrained(pair.teacher_chat_tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher).eval()
    encoder = RequestEncoder(chat, 512)
    outside: dict[int, list[float]] = {k: [] for k in ks}
    for word in TRANSLATION_WORDS:
        prompt = student_tok.apply_chat_template(
            translation_messages(word), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        for _ in range(samples_per_prompt):
            out = student.generate(
                prompt, do_sample=True, max_new_tokens=16, pad_token_id=student_tok.eos_token_id
            )
            text = student_tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
            prepared = encoder.prepare(TeacherRequest(translation_messages(word), text))
            with torch.no_grad():
                logits = teacher(torch.as_tensor(prepared.input_ids)[None]).logits[
                    0, prepared.prompt_len - 1 : -1
                ]
            probs = logits.float().softmax(-1).sort(-1, descending=True).values
            for k in ks:
                outside[k] += (1.0 - probs[:, :k].sum(-1)).tolist()
    print(f"\nteacher mass outside its top-k ({len(outside[ks[0]])} response positions): mean / median")
    print("| k | " + " | ".join(str(k) for k in ks) + " |")
    print("|---" * (len(ks) + 1) + "|")
    cells = [f"{np.mean(outside[k]):.3f} / {np.median(outside[k]):.3f}" for k in ks]
    print("| outside top-k | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["steps", "topk"], default=["steps", "topk"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from gold_plugin.pretrained import prepare_pretrained_pair

    torch.set_num_threads(args.threads)
    pair = prepare_pretrained_pair()
    with tempfile.TemporaryDirectory() as work:
        if "steps" in args.parts:
            gold_steps(pair, Path(work))
        if "topk" in args.parts:
            teacher_mass_outside_topk(pair)


if __name__ == "__main__":
    main()
