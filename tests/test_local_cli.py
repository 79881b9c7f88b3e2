"""The local backend's command line: one declaration per option, --demo defaults, which errors exit 2 (no models)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from gold_plugin.config import GoldConfig, GoldConfigError, TeacherConfig
from gold_plugin.demo import prepare, run
from gold_plugin.local import launch
from gold_plugin.local.cli import build_parser, main, parse_args
from gold_plugin.local.config import LocalTrainConfig, local_config_from_args, option_fields

ROWS = [{"input": "12+34=", "label": "64"}, {"input": "01+02=", "label": "30"}]
CLI_ONLY = {"help", "demo", "local.run_dir", "local.num_threads"}


def _jsonl(path: Path, rows: list[dict] = ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def captured_train(monkeypatch):
    """Replace the training run by a recorder of the configs it was given (and a two-evaluation history)."""
    calls: list[tuple[LocalTrainConfig, GoldConfig]] = []

    def fake_train(config, gold, *, quiet=False):
        calls.append((config, gold))
        return [{"step": 0, "eval/accuracy": 0.25}, {"step": 200, "eval/accuracy": 0.75}]

    monkeypatch.setattr(launch, "train", fake_train)
    return calls


@pytest.fixture
def fake_demo_models(monkeypatch):
    """``prepare_models`` without training: the demo's data files at the demo's paths, no models."""

    def fake_prepare(run_dir, **_options):
        teacher, student, train_data, eval_data = prepare.model_paths(run_dir)
        _jsonl(train_data), _jsonl(eval_data)
        return prepare.DemoModels(Path(run_dir), teacher, student, train_data, eval_data, 0.99, 0.25)

    monkeypatch.setattr(run, "prepare_models", fake_prepare)


def test_demo_keeps_options_given_at_the_parser_default(tmp_path, captured_train, fake_demo_models, capsys):
    # --gold.signal advantage and --gold.teacher.topk 0 are the parser's defaults; the demo's are logit and 8.
    # The demo used to rebuild the command line from values that differ from the defaults, so these two were
    # replaced by its own and the run trained with the logit signal.
    argv = [
        "--demo",
        "--local.run_dir",
        str(tmp_path),
        "--gold.signal",
        "advantage",
        "--gold.teacher.topk",
        "0",
    ]
    assert main([*argv, "--rollout.batch_size", "8"]) == 0
    [(config, gold)] = captured_train
    assert gold.signal == "advantage" and gold.teacher.topk == 0
    assert config.rollout_batch_size == 8  # the parser's default, given: kept
    # Not given: the demo's values, models and data.
    assert config.max_steps == 200 and config.learning_rate == 1e-3 and config.n_samples_per_prompt == 4
    teacher, student, train_data, _ = prepare.model_paths(tmp_path)
    assert config.student == str(student) and gold.teacher.model_name_or_path == str(teacher)
    assert config.prompt_dataset == str(train_data) and config.prompts == ROWS
    assert config.ckpt_path == str(tmp_path / "gold_run") and config.progress  # the demo's one progress bar
    assert config.reward_func is not None and config.label_key == "label"
    out = " ".join(capsys.readouterr().out.split())
    assert "| student after GOLD (200 steps) | 0.750 |" in out


def test_demo_defaults_are_the_defaults_under_demo_only(tmp_path):
    demo_args = vars(parse_args(["--demo", "--local.run_dir", str(tmp_path)]))
    plain_args = vars(parse_args([]))
    for name, value in run.DEMO_DEFAULTS.items():
        assert demo_args[name] == value
        assert plain_args[name] == build_parser().get_default(name) != value
    # An explicit value wins under --demo too.
    assert vars(parse_args(["--demo", "--local.max_steps", "7"]))["local.max_steps"] == 7


def test_every_local_option_is_declared_once_by_the_config():
    parser = build_parser()
    dests = {action.dest for action in parser._actions}
    options = {f.metadata["option"] for f in option_fields()}
    gold = {d for d in dests if d.startswith("gold.")}
    # Everything the parser has comes from LocalTrainConfig, GoldConfig, or the few CLI-only switches.
    assert dests == options | gold | CLI_ONLY
    for f in option_fields():
        assert parser.get_default(f.metadata["option"]) == f.default, f.name


def test_a_parsed_command_line_gives_the_configs_defaults(tmp_path):
    data = _jsonl(tmp_path / "train.jsonl", ROWS)
    args = build_parser().parse_args(
        ["--actor.model_name_or_path", "student", "--data.prompt_dataset", str(data)]
    )
    config = local_config_from_args(args)
    expected = LocalTrainConfig(
        student="student",
        prompt_dataset=str(data),
        prompts=ROWS,
        metrics_path=f"{LocalTrainConfig.ckpt_path}/metrics.jsonl",
    )
    assert config == expected
    assert isinstance(config.adam_betas, tuple)


def test_option_types_and_switches_parse():
    a = vars(
        parse_args(
            ["--actor.adam.betas", "0.8", "0.9", "--train.batch_size", "16", "--ckpt.load_enable"]
            + ["--local.no_progress", "--algo.advantage.estimator", "rloo", "--gold.advantage_norm", "mean"]
        )
    )
    assert a["actor.adam.betas"] == [0.8, 0.9] and a["train.batch_size"] == 16
    assert a["ckpt.load_enable"] and a["local.no_progress"]
    assert a["algo.advantage.estimator"] == "rloo" and a["gold.advantage_norm"] == "mean"
    with pytest.raises(SystemExit):
        parse_args(["--algo.advantage.estimator", "ppo"])


def test_config_is_frozen_and_validated_once():
    config = LocalTrainConfig(student="s", prompts=ROWS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.learning_rate = 1.0
    with pytest.raises(GoldConfigError, match="--rollout.batch_size must be >= 1"):
        dataclasses.replace(config, rollout_batch_size=0)
    with pytest.raises(GoldConfigError, match="--local.device 'gpu0' is not a device"):
        dataclasses.replace(config, device="gpu0")
    with pytest.raises(GoldConfigError, match=r"--algo.advantage.estimator must be one of \["):
        dataclasses.replace(config, advantage_estimator="ppo")
    with pytest.raises(GoldConfigError, match="--actor.model_name_or_path"):
        LocalTrainConfig(prompts=ROWS)
    with pytest.raises(GoldConfigError, match="No training prompts"):
        LocalTrainConfig(student="s")


def test_checks_against_the_gold_options():
    config = LocalTrainConfig(student="s", prompts=ROWS)
    with pytest.raises(GoldConfigError, match="--reward.remote_url"):
        config.check_gold(GoldConfig(alpha=0.5))
    with pytest.raises(GoldConfigError, match="--data.output_key"):
        config.check_gold(GoldConfig(lmbda=0.5, signal="logit", teacher=TeacherConfig(topk=4)))
    mixed = GoldConfig(lmbda=0.5, off_policy_source="reference_or_teacher", teacher=TeacherConfig(topk=4))
    with pytest.raises(GoldConfigError, match="--data.output_key .* or --gold.off_policy_source teacher"):
        config.check_gold(mixed)
    # The teacher writes every off-policy completion: no dataset completions needed.
    config.check_gold(GoldConfig(lmbda=0.5, off_policy_source="teacher", teacher=TeacherConfig(topk=4)))
    config.check_gold(GoldConfig(alpha=1.0))


def test_configuration_errors_exit_2_with_the_message(tmp_path, capsys):
    data = _jsonl(tmp_path / "train.jsonl")
    base = ["--actor.model_name_or_path", "s", "--gold.teacher.model_name_or_path", "t"]
    cases = {
        "no such file": ["--data.prompt_dataset", str(tmp_path / "missing.jsonl")],
        "takes a Python file": ["--data.prompt_dataset", str(data), "--reward.remote_url", "http://rm:5000"],
        "line 1: no 'question' key": ["--data.prompt_dataset", str(data), "--data.input_key", "question"],
        "--gold.alpha 0.5 < 1 mixes in a task reward": [
            "--data.prompt_dataset",
            str(data),
            "--gold.alpha",
            "0.5",
        ],
    }
    for message, extra in cases.items():
        with pytest.raises(SystemExit) as err:
            main(base + extra)
        assert err.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # no teacher: refused before any model is loaded
        main(["--actor.model_name_or_path", "s", "--data.prompt_dataset", str(data)])
    assert err.value.code == 2 and "Set --gold.teacher.model_name_or_path" in capsys.readouterr().err


def test_errors_while_training_keep_their_traceback(tmp_path, monkeypatch):
    def failing_train(config, gold):
        raise ValueError("a bug deep inside a training step")

    monkeypatch.setattr(launch, "train", failing_train)
    data = _jsonl(tmp_path / "train.jsonl")
    argv = ["--actor.model_name_or_path", "s", "--data.prompt_dataset", str(data)]
    with pytest.raises(ValueError, match="a bug deep inside"):  # not SystemExit(2): the traceback is kept
        main(argv + ["--gold.teacher.model_name_or_path", "t"])


def test_cpu_teacher_group_asks_for_no_gpu_without_changing_the_config(monkeypatch):
    started = []
    monkeypatch.setattr(
        launch, "RayTeacher", lambda teacher, device, quiet: started.append((teacher, device))
    )
    gold = GoldConfig(teacher=TeacherConfig(model_name_or_path="t", num_gpus_per_replica=1.0))
    launch.make_teacher(gold.teacher, in_process=False, device="cpu")
    [(teacher, device)] = started
    assert teacher.num_gpus_per_replica == 0.0 and device == "cpu"
    assert gold.teacher.num_gpus_per_replica == 1.0  # the validated config is not mutated
    launch.make_teacher(gold.teacher, in_process=False, device="cuda")
    assert started[1][0] is gold.teacher
