"""The local backend end to end: the demo's models, GOLD through a Ray teacher, checkpoints and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gold_plugin.local.cli import main
from gold_plugin.local.demo import demo_argv, prepare_models, with_teacher_tokenizer

pytestmark = pytest.mark.slow

FAST = [
    "--actor.lr_warmup_ratio", "0", "--actor.min_lr_ratio", "1",
    "--rollout.batch_size", "32", "--rollout.n_samples_per_prompt", "4", "--rollout.max_new_tokens", "6",
    "--train.micro_batch_size", "128", "--gold.teacher.micro_batch_size", "128",
    "--gold.signal", "logit", "--gold.teacher.topk", "8", "--local.no_progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(2)
    return prepare_models(tmp_path_factory.mktemp("demo"))


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_models_use_different_tokenizers(models):
    from gold_plugin.alignment import VocabMap

    student = AutoTokenizer.from_pretrained(models.student_init)
    teacher = AutoTokenizer.from_pretrained(models.teacher)
    assert student.eos_token != teacher.eos_token
    assert student("12+34=")["input_ids"] != teacher("12+34=")["input_ids"]  # no shared ids
    mapping = VocabMap(student, teacher).teacher_to_student
    assert mapping[teacher.convert_tokens_to_ids("7")] == student.convert_tokens_to_ids("7")
    assert models.teacher_accuracy > 0.9 and models.student_init_accuracy < 0.5


def test_same_tokenizer_copy_is_the_same_function(models, tmp_path):
    copy = with_teacher_tokenizer(models.student_init, models.teacher, tmp_path / "copy")
    student = AutoModelForCausalLM.from_pretrained(models.student_init)
    twin = AutoModelForCausalLM.from_pretrained(copy)
    s_tok, t_tok = AutoTokenizer.from_pretrained(models.student_init), AutoTokenizer.from_pretrained(copy)
    s_ids, t_ids = s_tok("12+34=081")["input_ids"], t_tok("12+34=081")["input_ids"]
    with torch.no_grad():
        s_logits = student(torch.tensor([s_ids])).logits[0]
        t_logits = twin(torch.tensor([t_ids])).logits[0]
    digits = [str(d) for d in range(10)]
    torch.testing.assert_close(
        s_logits[:, s_tok.convert_tokens_to_ids(digits)], t_logits[:, t_tok.convert_tokens_to_ids(digits)]
    )


@pytest.mark.ray
def test_gold_lifts_a_weak_student_through_a_ray_teacher(models, tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = demo_argv(
        models,
        [*FAST, "--actor.adam.lr", "2e-4", "--local.max_steps", "120", "--eval.steps", "60",
         "--train.seed", "0", "--ckpt.path", str(ckpt), "--logger.tensorboard_dir", str(tmp_path / "tb")],
    )  # fmt: skip
    assert main(argv) == 0
    history = _metrics(ckpt / "metrics.jsonl")
    evals = [h["eval/accuracy"] for h in history if "eval/accuracy" in h]
    assert evals[0] == pytest.approx(models.student_init_accuracy)
    assert evals[-1] >= evals[0] + 0.15, evals
    trained = [h for h in history if "gold/logit_loss" in h]
    assert len(trained) == 120 and all(h["gold/unaligned_samples"] <= 4 for h in trained)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    final = ckpt / "global_step120"  # a Hugging Face folder: model + the student's own tokenizer
    assert AutoModelForCausalLM.from_pretrained(final).config.eos_token_id == AutoTokenizer.from_pretrained(
        final
    ).convert_tokens_to_ids("</s>")


def test_resume_continues_the_same_run(models, tmp_path):
    common = [*FAST, "--actor.adam.lr", "2e-4", "--local.max_steps", "4", "--ckpt.save_steps", "2",
              "--eval.steps", "0", "--local.teacher_in_process", "--train.seed", "3"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(demo_argv(models, [*common, "--ckpt.path", str(straight)])) == 0
    interrupted = [*common, "--ckpt.path", str(split)]
    interrupted[interrupted.index("--local.max_steps") + 1] = "2"
    assert main(demo_argv(models, interrupted)) == 0
    assert main(demo_argv(models, [*common, "--ckpt.path", str(split), "--ckpt.load_enable"])) == 0

    a = AutoModelForCausalLM.from_pretrained(straight / "global_step4").state_dict()
    b = AutoModelForCausalLM.from_pretrained(split / "global_step4").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = AutoModelForCausalLM.from_pretrained(split / "global_step2").state_dict()
    assert not all(torch.equal(a[k], first[k]) for k in a)  # steps 3 and 4 really trained
    keys = ("gold/logit_loss", "rollout/response_length", "train/grad_norm")
    resumed = [{k: h[k] for k in keys} for h in _metrics(split / "metrics.jsonl") if h["step"] > 2]
    reference = [{k: h[k] for k in keys} for h in _metrics(straight / "metrics.jsonl") if h["step"] > 2]
    assert resumed == reference and len(resumed) == 2


def test_clear_errors(models, tmp_path):
    with pytest.raises(SystemExit) as err:
        main(
            demo_argv(
                models, [*FAST, "--gold.alpha", "0.5", "--reward.remote_url", str(tmp_path / "none.py")]
            )
        )
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        main(["--actor.model_name_or_path", str(models.student_init)])
