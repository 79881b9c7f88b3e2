"""The local backend end to end: the demo's models, GOLD through a Ray teacher, checkpoints and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gold_plugin.demo.prepare import with_teacher_tokenizer
from gold_plugin.demo.run import demo_argv
from gold_plugin.local.cli import main
from gold_plugin.step import per_unit_means

pytestmark = pytest.mark.slow

FAST = [
    "--actor.lr_warmup_ratio", "0", "--actor.min_lr_ratio", "1",
    "--rollout.batch_size", "32", "--rollout.n_samples_per_prompt", "4", "--rollout.max_new_tokens", "6",
    "--train.micro_batch_size", "128", "--gold.teacher.micro_batch_size", "128",
    "--gold.signal", "logit", "--gold.teacher.topk", "8", "--local.no_progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def models(demo_models):
    return demo_models


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
    """The teacher re-indexed to another single-digit tokenizer (the experiment's same-tokenizer reference for a
    single-digit student) computes the same function under the other ids."""
    from gold_plugin.demo.tokenizers import build_tokenizer

    other = tmp_path / "student_digits"
    build_tokenizer("student_digits", other)
    copy = with_teacher_tokenizer(models.teacher, other, tmp_path / "copy")
    teacher = AutoModelForCausalLM.from_pretrained(models.teacher)
    twin = AutoModelForCausalLM.from_pretrained(copy)
    t_tok, c_tok = AutoTokenizer.from_pretrained(models.teacher), AutoTokenizer.from_pretrained(copy)
    t_ids, c_ids = t_tok("12+34=081")["input_ids"], c_tok("12+34=081")["input_ids"]
    assert t_ids != c_ids and len(t_ids) == len(c_ids)
    with torch.no_grad():
        t_logits = teacher(torch.tensor([t_ids])).logits[0]
        c_logits = twin(torch.tensor([c_ids])).logits[0]
    digits = [str(d) for d in range(10)]
    torch.testing.assert_close(
        t_logits[:, t_tok.convert_tokens_to_ids(digits)], c_logits[:, c_tok.convert_tokens_to_ids(digits)]
    )


def test_a_teacher_moved_into_a_real_vocabulary_keeps_its_function(models, tmp_path):
    """The experiment's real pair: the single-digit teacher moved into Qwen's 151,851 ids (its pieces for the task
    are Qwen's: one token per digit, '+', '='). The task's tokens keep their rows, so their logits are unchanged;
    the other rows are the seeded initialisation draw; without ``fill_unmatched`` it is refused."""
    from gold_plugin.demo.tokenizers import build_tokenizer

    qwen = build_tokenizer("qwen", tmp_path / "tok_qwen")
    assert len(qwen) == 151_851
    with pytest.raises(ValueError, match="teacher tokens have no student token with the same bytes"):
        with_teacher_tokenizer(models.teacher, tmp_path / "tok_qwen", tmp_path / "refused")
    moved = with_teacher_tokenizer(
        models.teacher, tmp_path / "tok_qwen", tmp_path / "moved", fill_unmatched=True
    )
    teacher, twin = (
        AutoModelForCausalLM.from_pretrained(models.teacher),
        AutoModelForCausalLM.from_pretrained(moved),
    )
    t_tok = AutoTokenizer.from_pretrained(models.teacher)
    t_ids, q_ids = t_tok("12+34=")["input_ids"], qwen("12+34=")["input_ids"]
    assert len(q_ids) == len(t_ids) == 6
    digits = [str(d) for d in range(10)]
    # EOS paired by role: <|endoftext|> -> <|im_end|>
    answer, q_answer = [*digits, t_tok.eos_token], [*digits, qwen.eos_token]
    with torch.no_grad():
        t_logits = teacher(torch.tensor([t_ids])).logits[0]
        q_logits = twin(torch.tensor([q_ids])).logits[0]
    torch.testing.assert_close(
        t_logits[:, t_tok.convert_tokens_to_ids(answer)], q_logits[:, qwen.convert_tokens_to_ids(q_answer)]
    )
    # A token the toy vocabulary lacks gets its row of the seeded normal draw at the model's init scale.
    rows = twin.get_input_embeddings().weight.detach()
    draw = torch.empty_like(rows).normal_(0.0, teacher.config.initializer_range,
                                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    hello = qwen.convert_tokens_to_ids("hello")
    torch.testing.assert_close(rows[hello], draw[hello])
    assert twin.config.vocab_size == 151_851 and twin.config.eos_token_id == qwen.eos_token_id


def test_the_answer_only_output_layer_gives_the_same_log_probs(models):
    """``response_logits_only`` (the real tokenizers' SFT) runs the output layer from the shortest prompt's last
    token on: the same action logits and log-probs as the full forward, rows of different prompt lengths."""
    from gold_plugin.local.modeling import response_forward

    model = AutoModelForCausalLM.from_pretrained(models.teacher)
    prompts, responses = [[5, 6, 7, 8], [5, 6], [9, 9, 9]], [[3, 4], [2, 3, 4, 5], [1]]
    with torch.no_grad():
        full = response_forward(model, prompts, responses, pad_id=0)
        kept = response_forward(model, prompts, responses, pad_id=0, response_logits_only=True)
    torch.testing.assert_close(kept.action_logits, full.action_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept.logprobs, full.logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(kept.action_mask, full.action_mask) and full.action_mask.sum() == 7


@pytest.mark.ray
def test_gold_lifts_a_weak_student_through_a_ray_teacher(models, tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = demo_argv(
        models,
        [*FAST, "--gold.logit_projection", "bytes", "--actor.adam.lr", "1e-3", "--local.max_steps", "160",
         "--eval.steps", "80",
         "--train.seed", "0", "--ckpt.path", str(ckpt), "--logger.tensorboard_dir", str(tmp_path / "tb")],
    )  # fmt: skip
    assert main(argv) == 0
    history = _metrics(ckpt / "metrics.jsonl")
    evals = [h["eval/accuracy"] for h in history if "eval/accuracy" in h]
    assert evals[0] == pytest.approx(models.student_init_accuracy)
    # The demo's hard pair: a merged-digit student distilled from a single-digit teacher by the byte projection.
    assert evals[-1] >= evals[0] + 0.1, evals
    trained = [h for h in history if "gold/logit_loss" in h]
    assert len(trained) == 160 and all(h["gold/unaligned"] <= 4 / 128 for h in trained)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    final = ckpt / "global_step160"  # a Hugging Face folder: model + the student's own tokenizer
    assert AutoModelForCausalLM.from_pretrained(final).config.eos_token_id == AutoTokenizer.from_pretrained(
        final
    ).convert_tokens_to_ids("</s>")


def test_resume_continues_the_same_run(models, tmp_path, capsys):
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
    assert "GOLD options differ" not in capsys.readouterr().err
    # Resumed with another GOLD option: the run says which, against the checkpoint's saved config.
    assert (
        main(
            demo_argv(
                models, [*common, "--ckpt.path", str(split), "--ckpt.load_enable", "--gold.beta", "0.3"]
            )
        )
        == 0
    )
    assert "GOLD options differ from the checkpoint's" in capsys.readouterr().err


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


def test_lmbda_trains_a_share_of_the_prompts_on_their_reference_completions(models, tmp_path):
    """``--gold.lmbda 0.25``: 24 of 32 prompts use the dataset's answer (logit loss only, no policy gradient)."""
    import dataclasses

    from gold_plugin.local.cli import build_parser
    from gold_plugin.local.config import configs_from_args
    from gold_plugin.local.trainer import LocalTrainer
    from gold_plugin.teacher import build_teacher
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    options = [*FAST, "--gold.lmbda", "0.25", "--data.output_key", "output", "--local.teacher_in_process"]
    ckpt = tmp_path / "ckpt"
    steps = ["--local.max_steps", "2", "--eval.steps", "0", "--ckpt.path", str(ckpt)]
    assert main(demo_argv(models, [*options, *steps])) == 0
    history = [h for h in _metrics(ckpt / "metrics.jsonl") if "gold/off_policy" in h]
    assert [h["gold/off_policy"] for h in history] == [0.75, 0.75]
    assert all(h["gold/missing_reference"] == 0 and h["gold/logit_loss"] > 0 for h in history)

    # One step by hand, with the advantage signal on and a prompt without reference completion.
    config, gold = configs_from_args(build_parser().parse_args(demo_argv(models, options)))
    gold = dataclasses.replace(gold, signal="both")
    trainer = LocalTrainer(
        config, gold, build_teacher(gold.teacher, device="cpu"), load_teacher_tokenizer(gold.teacher)
    )
    rows = trainer.batch_rows(0)
    rows[0] = {k: v for k, v in rows[0].items() if k != "output"}
    rollout, off, missing = trainer.make_rollout(rows, step=0)
    assert int(off.sum()) + int(missing.sum()) == 24 * 4 and len(rollout.response_ids) == 128
    tok = trainer.tokenizer
    for i in off.nonzero().flatten().tolist():
        answer = rows[rollout.prompt_index[i]]["output"]
        assert rollout.response_ids[i] == tok(answer, add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]
    experience = trainer.make_experience(rows, rollout, off, missing)
    assert experience.advantages[off].abs().sum() == 0  # no policy gradient on off-policy text
    assert experience.advantages[~off].abs().sum() > 0
    assert experience.metrics["gold/off_policy"] == pytest.approx(float(off.float().mean()))
    loss, metrics = trainer.micro_batch_loss(experience, off.nonzero().flatten().tolist(), 128.0)
    assert metrics["gold/logit_positions"] > 0 and metrics["train/policy_loss"] == 0.0
    # the byte projection (the default)
    assert 0.0 <= per_unit_means(metrics)["gold/projection_remainder"] <= 1.0
    loss.backward()  # the logit loss trains on the reference completions
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())


def test_a_refitted_hidden_state_bridge_is_fitted_on_every_step(models, tmp_path):
    """``--gold.hidden_state_bridge refit``: the fit is logged at both steps, and the map saved after step 2 is not
    the one saved after step 1 (the student moved in between; a frozen bridge would be the same)."""
    ckpt = tmp_path / "ckpt"
    options = [
        *FAST,
        "--gold.signal",
        "hidden",
        "--gold.hidden_state_bridge",
        "refit",
        "--local.teacher_in_process",
    ]
    steps = [
        "--eval.steps",
        "0",
        "--local.max_steps",
        "2",
        "--ckpt.path",
        str(ckpt),
        "--ckpt.save_steps",
        "1",
    ]
    assert main(demo_argv(models, [*options, *steps])) == 0
    history = [h for h in _metrics(ckpt / "metrics.jsonl") if "gold/hidden_state_loss" in h]
    assert len(history) == 2 and all(0.0 < h["gold/hidden_bridge_fit"] <= 1.0 for h in history)
    maps = [
        torch.load(ckpt / f"global_step{step}" / "trainer_state.pt", weights_only=False)["signals"][
            "hidden_state"
        ]
        for step in (1, 2)
    ]
    assert not torch.allclose(maps[0]["student_map"], maps[1]["student_map"])


def test_the_hidden_state_loss_alone_fits_its_bridge_once_and_trains_the_student(models, tmp_path):
    """``--gold.signal hidden``: the bridge is fitted on the first step only, saved with the checkpoint and loaded
    back; one update on a fixed batch lowers the hidden-state loss (the only term: no advantages, no logit loss)."""
    from gold_plugin.local.cli import build_parser
    from gold_plugin.local.config import configs_from_args
    from gold_plugin.local.trainer import LocalTrainer
    from gold_plugin.teacher import build_teacher
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    options = [*FAST, "--gold.signal", "hidden", "--local.teacher_in_process", "--eval.steps", "0"]
    ckpt = tmp_path / "ckpt"
    steps = ["--local.max_steps", "2", "--ckpt.path", str(ckpt), "--ckpt.save_steps", "2"]
    assert main(demo_argv(models, [*options, *steps])) == 0
    history = [h for h in _metrics(ckpt / "metrics.jsonl") if "gold/hidden_state_loss" in h]
    assert len(history) == 2 and all(h["gold/hidden_state_loss"] > 0 for h in history)
    assert 0.0 < history[0]["gold/hidden_bridge_fit"] <= 1.0 and "gold/hidden_bridge_fit" not in history[1]
    assert all(h["gold/hidden_state_groups"] > 1 and "gold/logit_loss" not in h for h in history)
    saved = torch.load(ckpt / "global_step2" / "trainer_state.pt", weights_only=False)["signals"][
        "hidden_state"
    ]
    assert saved["student_map"].shape == (2, 128, 64)  # 2 layer pairs, the student's width, the default rank

    config, gold = configs_from_args(
        build_parser().parse_args(demo_argv(models, [*options, *steps, "--ckpt.load_enable"]))
    )
    trainer = LocalTrainer(
        config, gold, build_teacher(gold.teacher, device="cpu"), load_teacher_tokenizer(gold.teacher)
    )
    assert trainer.step == 2 and torch.equal(
        trainer.losses["hidden_state"].bridge.student_map, saved["student_map"]
    )
    rows = trainer.batch_rows(trainer.step)
    rollout, off, missing = trainer.make_rollout(rows, trainer.step)
    experience = trainer.make_experience(rows, rollout, off, missing)
    assert experience.advantages.abs().sum() == 0
    everyone = list(range(len(rollout.response_ids)))
    before, parts = trainer.micro_batch_loss(experience, everyone, 1.0)
    assert parts["train/policy_loss"] == 0.0 and float(before) > 0
    trainer.optimizer.zero_grad()
    before.backward()
    trainer.optimizer.step()
    after, _ = trainer.micro_batch_loss(experience, everyone, 1.0)
    assert float(after) < float(before)


def test_bad_samples_are_counted_and_the_step_trains_on(models, tmp_path, monkeypatch):
    """Sample problems forced through the real trainer's step (sampling, in-process teacher, GOLD step, update):
    one prompt longer than the teacher's context (``--gold.teacher.max_len 24``: its 4 samples get no
    distillation signal, counted in ``gold/teacher_prompt_truncated``), a response that is EOS at once and one of
    only special tokens (``<pad> <pad> </s>``): both keep the teacher's verdict on ending right after the prompt
    (checked against a fresh score of the same request) and are counted in ``gold/empty_response``. No traceback,
    no sample dropped, the weights move."""
    from gold_plugin.local.cli import build_parser
    from gold_plugin.local.config import configs_from_args
    from gold_plugin.local.trainer import LocalTrainer
    from gold_plugin.teacher import TeacherRequest, build_teacher
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    options = [*FAST, "--gold.signal", "both", "--gold.advantage_norm", "none", "--gold.teacher.max_len", "24",
               "--local.teacher_in_process", "--local.max_steps", "1", "--eval.steps", "0",
               "--ckpt.path", str(tmp_path)]  # fmt: skip
    config, gold = configs_from_args(build_parser().parse_args(demo_argv(models, options)))
    teacher = build_teacher(gold.teacher, device="cpu")
    trainer = LocalTrainer(config, gold, teacher, load_teacher_tokenizer(gold.teacher))
    tok = trainer.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    long_prompt = "1234567890" * 4 + "12+34="  # 46 teacher tokens (single digits): more than its 24
    batch_rows, make_rollout, make_experience = (
        trainer.batch_rows,
        trainer.make_rollout,
        trainer.make_experience,
    )

    def rows_with_a_long_prompt(step):
        rows = batch_rows(step)
        return [{**rows[0], "input": long_prompt}, *rows[1:]]

    def rollout_with_empty_responses(rows, step):
        rollout, off, missing = make_rollout(rows, step)  # the student's own samples
        rollout.response_ids[4], rollout.response_ids[5] = [eos], [pad, pad, eos]  # prompt 1's first two
        rollout.ends_with_eos[4] = rollout.ends_with_eos[5] = True
        return rollout, off, missing

    seen = []
    monkeypatch.setattr(trainer, "batch_rows", rows_with_a_long_prompt)
    monkeypatch.setattr(trainer, "make_rollout", rollout_with_empty_responses)
    monkeypatch.setattr(trainer, "make_experience", lambda *a: seen.append(make_experience(*a)) or seen[-1])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()

    [experience] = seen
    assert len(experience.rollout.response_ids) == experience.advantages.shape[0] == 128
    assert metrics["gold/teacher_prompt_truncated"] == pytest.approx(4 / 128)
    assert metrics["gold/empty_response"] == pytest.approx(2 / 128)
    aligned = experience.aligned
    assert aligned.prompt_truncated.nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert aligned.empty_response.nonzero().flatten().tolist() == [4, 5]
    assert all(a.reason.startswith("teacher: prompt cut by") for a in aligned.alignments[:4])
    assert experience.advantages[:4].abs().sum() == 0  # reward-free: no signal at all for the cut prompt
    rows_with_positions = experience.prepared["logit"].sample_index.tolist()
    assert not set(rows_with_positions) & {0, 1, 2, 3}
    assert rows_with_positions.count(4) == rows_with_positions.count(5) == 1  # the end pair
    # The empty responses' signal: the teacher's log-prob of ending right after "a+b=", scored afresh.
    prompt = experience.rollout.prompt_ids[4]
    [ended] = teacher.score([TeacherRequest(tok.decode(prompt), "", ends_with_eos=True)])
    old = experience.old_logprobs
    torch.testing.assert_close(
        experience.advantages[4, :1],
        gold.advantage_weight * (ended.logprobs[0] - old[4, :1]),
        rtol=1e-4,
        atol=1e-5,
    )
    torch.testing.assert_close(
        experience.advantages[5, :3],
        gold.advantage_weight * (ended.logprobs[0] - old[5, :3].sum()).expand(3),
        rtol=1e-4,
        atol=1e-5,
    )
    assert experience.advantages[6:].abs().sum() > 0  # the rest of the batch trains as before
    assert math.isfinite(metrics["gold/logit_loss"]) and math.isfinite(metrics["train/policy_loss"])
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.model.parameters()))


def test_teacher_written_off_policy_completions(models, tmp_path):
    """``--gold.lmbda 0.5 --gold.off_policy_source teacher``: half the prompts train on a completion the teacher
    writes (no dataset completions needed); ``reference_or_teacher``: the dataset's where the row has one."""
    import dataclasses

    import numpy as np

    from gold_plugin.alignment import encode_continuation
    from gold_plugin.local.cli import build_parser
    from gold_plugin.local.config import configs_from_args
    from gold_plugin.local.trainer import LocalTrainer
    from gold_plugin.step import draw_off_policy
    from gold_plugin.teacher import build_teacher
    from gold_plugin.teacher.generation import GenerationParams
    from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

    options = [
        *FAST,
        "--gold.lmbda",
        "0.5",
        "--gold.off_policy_source",
        "teacher",
        "--local.teacher_in_process",
    ]
    ckpt = tmp_path / "ckpt"
    assert (
        main(
            demo_argv(
                models, [*options, "--local.max_steps", "2", "--eval.steps", "0", "--ckpt.path", str(ckpt)]
            )
        )
        == 0
    )
    history = [h for h in _metrics(ckpt / "metrics.jsonl") if "gold/off_policy" in h]
    assert [(h["gold/off_policy_teacher"], h["gold/off_policy_reference"]) for h in history] == [
        (0.5, 0.0)
    ] * 2
    assert all(h["gold/off_policy"] == 0.5 and h["gold/missing_reference"] == 0 for h in history)
    assert all(h["gold/logit_loss"] > 0 and h["gold/teacher_generation_seconds"] > 0 for h in history)

    # One rollout by hand: the completions are the teacher's (same prompts, parameters and seed), re-tokenised by
    # the student like a dataset answer.
    config, gold = configs_from_args(build_parser().parse_args(demo_argv(models, options)))
    teacher = build_teacher(gold.teacher, device="cpu")
    trainer = LocalTrainer(config, gold, teacher, load_teacher_tokenizer(gold.teacher))
    rows = trainer.batch_rows(0)
    rollout, off, missing = trainer.make_rollout(rows, step=0)
    drawn = sorted({rollout.prompt_index[i] for i in off.nonzero().flatten().tolist()})
    assert len(drawn) == 16 and not missing.any() and rollout.teacher_written == off.tolist()
    seed = int(np.random.SeedSequence([config.seed, 0, 1]).generate_state(1)[0])
    in_text_order = sorted(drawn, key=lambda i: trainer._student_prompt(rows[i]))  # one call, in that order
    texts = teacher.generate(
        [trainer._student_prompt(rows[i]) for i in in_text_order],
        GenerationParams(6, config.temperature, config.top_p, seed),
    )
    tok = trainer.tokenizer
    for i, generation in zip(in_text_order, texts):
        expected = encode_continuation(tok, generation.text) + (
            [tok.eos_token_id] if generation.finished else []
        )
        samples = [r for j, r in enumerate(rollout.response_ids) if rollout.prompt_index[j] == i]
        assert samples == [expected[:6]] * 4
    # The teacher's answers in the task's format (it writes the 3-digit sum and ends its turn), sampled at the
    # rollout's temperature 1: not always the dataset's answer.
    assert all(g.finished and len(g.text) == 3 and g.text.isdigit() for g in texts)
    assert 0 < sum(g.text == rows[i]["output"] for i, g in zip(in_text_order, texts)) < 16
    experience = trainer.make_experience(rows, rollout, off, missing)
    assert experience.metrics["gold/off_policy_teacher"] == experience.metrics["gold/off_policy"] == 0.5
    assert experience.advantages[off].abs().sum() == 0

    # reference_or_teacher: a drawn row without the dataset's answer gets the teacher's, the others keep theirs.
    mixed = dataclasses.replace(gold, off_policy_source="reference_or_teacher")
    config = dataclasses.replace(config, output_key="output")
    trainer = LocalTrainer(config, mixed, teacher, load_teacher_tokenizer(gold.teacher))
    rows = [dict(r) for r in rows]
    del rows[drawn[0]]["output"]
    assert draw_off_policy(
        [r.get("output") for r in rows], mixed, config.seed, 0, [trainer._student_prompt(r) for r in rows]
    ).teacher.nonzero()[0].tolist() == [drawn[0]]
    rollout, off, missing = trainer.make_rollout(rows, step=0)
    for j, i in enumerate(rollout.prompt_index):
        if i in drawn[1:]:
            assert rollout.response_ids[j] == tok(rows[i]["output"], add_special_tokens=False)[
                "input_ids"
            ] + [tok.eos_token_id]
        assert rollout.teacher_written[j] == (i == drawn[0])
    experience = trainer.make_experience(rows, rollout, off, missing)
    assert experience.metrics["gold/off_policy_teacher"] == pytest.approx(4 / 128)
    assert experience.metrics["gold/off_policy_reference"] == pytest.approx(60 / 128)


def test_a_run_without_distillation_signal_says_why_and_stops(models, tmp_path, capsys):
    """Every teacher prompt cut to a 4-token context: each step says on the console that no sample got a
    signal, with the reason counted, and the run stops at --gold.max_steps_without_signal (2) instead of training on
    nothing; chat prompts for a teacher without a chat template are refused before anything loads."""
    from gold_plugin.step.no_signal import NoDistillationSignalError

    options = [*FAST, "--gold.teacher.max_len", "4", "--gold.max_steps_without_signal", "2",
               "--local.teacher_in_process", "--local.max_steps", "5", "--eval.steps", "0",
               "--ckpt.path", str(tmp_path)]  # fmt: skip
    with pytest.raises(
        NoDistillationSignalError, match=r"GOLD step 2: none of the 128 samples .* Stopping"
    ) as err:
        main(demo_argv(models, options))
    assert "128 x the teacher's prompt was cut to fit its context" in str(err.value)
    assert (
        "WARNING: GOLD step 1: none of the 128 samples got a distillation signal" in capsys.readouterr().err
    )
    assert not AutoTokenizer.from_pretrained(models.teacher).chat_template
    with pytest.raises(SystemExit) as exit_:
        main(demo_argv(models, [*FAST, "--data.apply_chat_template"]))
    assert exit_.value.code == 2
    assert "has no chat template, but the prompts are chat messages" in capsys.readouterr().err
