"""The launcher's parser against OpenRLHF 0.11.2's own parser, validation, --dry_run, --help and --backend local.

OpenRLHF's parser is inline under ``if __name__ == "__main__"`` in ``openrlhf/cli/train_ppo_ray.py``; these tests
build it from that installed source file (its own statements, run with argparse) and compare option by option.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import io
import json
import subprocess
import sys
import types
from datetime import datetime
from pathlib import Path

import pytest

from gold_plugin import cli as front_door
from gold_plugin.config import GoldConfigError
from gold_plugin.integrations.openrlhf import cli
from gold_plugin.integrations.openrlhf.args import (
    OPENRLHF_DEFAULTS,
    build_parser,
    fill_gold_defaults,
    nest_namespace,
)
from gold_plugin.integrations.openrlhf.dry_run import run_dry_run
from gold_plugin.integrations.openrlhf.launch_plan import resolve_launch

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "train_gold.py"

# Option lists of OpenRLHF's own example scripts, in 0.11.2 spelling. Sources (OpenRLHF/OpenRLHF):
# examples/scripts/train_prorlv2_math_hybrid_engine.sh, the async/partial-rollout agent recipe in docs, and the
# hybrid-engine PPO command of README.md. Those files are from 0.10.x/0.11.x: options that 0.11.2 renamed are
# translated as 0.11.2 documents them (`--algo.advantage.is_correction_enable --algo.advantage.is_correction_type
# icepop` -> `--algo.advantage.is_correction_level token --algo.advantage.is_correction_mode mask`;
# `--prompt_max_len 1024 --generate_max_len 1024` -> `--data.max_len 2048 --rollout.max_new_tokens 1024`).
PRORL_V2_GRPO = """
--ref.num_nodes 1 --ref.num_gpus_per_node 8 --actor.num_nodes 1 --actor.num_gpus_per_node 8
--vllm.num_engines 8 --vllm.tensor_parallel_size 1 --train.colocate_all --vllm.gpu_memory_utilization 0.75
--algo.kl.init_coef 1e-4 --algo.advantage.gamma 1.0 --algo.kl.use_loss --algo.kl.estimator k2
--algo.advantage.estimator reinforce_baseline --algo.dynamic_filtering_enable --algo.dynamic_filtering_range 0 1
--actor.eps_clip_low_high 0.2 0.27 --actor.model_name_or_path /models/student
--reward.remote_url /work/math_reward_func.py --ckpt.output_dir /out --ckpt.path /out/ckpt --ckpt.save_steps 5
--ckpt.save_hf --train.batch_size 1024 --rollout.batch_size 512 --rollout.n_samples_per_prompt 16
--train.dynamic_batch_enable --train.num_episodes 100 --data.max_len 9216 --rollout.max_new_tokens 8192
--ds.zero_stage 3 --ds.param_dtype bf16 --actor.adam.lr 1e-6 --data.prompt_dataset /data/prompts.jsonl
--data.input_key prompt --data.label_key label --eval.dataset OpenRLHF/aime-2024 --eval.steps 5
--eval.temperature 1.0 --eval.n_samples_per_prompt 4 --data.apply_chat_template
--actor.gradient_checkpointing_enable --ds.packing_samples --vllm.sync_backend nccl --vllm.enforce_eager
--vllm.enable_sleep --ds.enable_sleep --algo.advantage.is_correction_level token
--algo.advantage.is_correction_mode mask --algo.advantage.is_correction_threshold 0.5 5.0
--train.max_tokens_per_gpu 32768 --reward.stop_properly_penalty_coef 0.0
"""
ASYNC_AGENT_REINFORCE = """
--actor.model_name_or_path /models/student --train.agent_func_path /work/agent_func.py
--data.prompt_dataset zhuzilin/dapo-math-17k --data.input_key prompt --data.label_key label
--data.apply_chat_template --ds.packing_samples --train.async_enable --train.partial_rollout_enable
--ref.num_nodes 1 --ref.num_gpus_per_node 4 --actor.num_nodes 1 --actor.num_gpus_per_node 4
--vllm.num_engines 2 --vllm.tensor_parallel_size 2 --vllm.gpu_memory_utilization 0.95 --train.colocate_all
--ds.enable_sleep --vllm.sync_backend nccl --vllm.enforce_eager --rollout.batch_size 128
--rollout.n_samples_per_prompt 8 --train.batch_size 1024 --algo.dynamic_filtering_enable
--algo.dynamic_filtering_range 0.0 1.0 --train.dynamic_batch_enable --train.max_tokens_per_gpu 16192
--rollout.max_tokens_per_gpu 32768 --train.micro_batch_size 1 --rollout.micro_batch_size 8
--data.max_len 74240 --rollout.max_new_tokens 64000 --data.max_samples 128000 --train.max_epochs 1
--train.num_episodes 1 --algo.advantage.estimator reinforce_baseline --actor.adam.lr 5e-7
--actor.entropy_coef 0.0 --algo.kl.init_coef 1e-5 --algo.kl.use_loss --algo.kl.estimator k2
--algo.advantage.is_correction_level token --algo.advantage.is_correction_mode mask --ds.zero_stage 3
--actor.gradient_checkpointing_enable --ds.ring_attn_size 2 --ds.ring_attn_head_stride 2 --ds.param_dtype bf16
--ckpt.output_dir ./exp/Qwen3-4B-Thinking --ckpt.path ./exp/Qwen3-4B-Thinking/ckpt --ckpt.save_hf
--ckpt.max_num 3 --ckpt.save_steps 10 --logger.logging_steps 1 --eval.steps -1
"""
HYBRID_ENGINE_PPO = """
--ref.num_nodes 1 --ref.num_gpus_per_node 8 --reward.num_nodes 1 --reward.num_gpus_per_node 8
--critic.num_nodes 1 --critic.num_gpus_per_node 8 --actor.num_nodes 1 --actor.num_gpus_per_node 8
--vllm.num_engines 4 --vllm.tensor_parallel_size 2 --train.colocate_all --vllm.gpu_memory_utilization 0.5
--actor.model_name_or_path OpenRLHF/Llama-3-8b-sft-mixture --reward.model_name_or_path OpenRLHF/Llama-3-8b-rm-700k
--ckpt.output_dir /out/final --ckpt.path /out/ckpt --ckpt.save_hf --train.batch_size 128 --rollout.batch_size 1024
--train.dynamic_batch_enable --rollout.n_samples_per_prompt 1 --train.max_epochs 1 --data.max_len 2048
--rollout.max_new_tokens 1024 --data.max_samples 100000 --ds.zero_stage 3 --ds.param_dtype bf16
--actor.adam.lr 5e-7 --critic.adam.lr 9e-6 --algo.kl.init_coef 0.01
--data.prompt_dataset OpenRLHF/prompt-collection-v0.1 --data.input_key context_messages --data.apply_chat_template
--reward.normalize_enable --actor.gradient_checkpointing_enable --ds.packing_samples --vllm.sync_backend nccl
--vllm.enforce_eager --vllm.enable_sleep --ds.enable_sleep --logger.wandb.key abc
--actor.muon.no_nesterov --ds.lora.target_modules q_proj v_proj --reward.clip_range -5 5
"""
EXAMPLE_SCRIPTS = {
    "prorl_v2_grpo": PRORL_V2_GRPO,
    "async_agent": ASYNC_AGENT_REINFORCE,
    "hybrid_ppo": HYBRID_ENGINE_PPO,
}

GOLD_OPTIONS = [
    "--gold.teacher.model_name_or_path",
    "/models/teacher",
    "--gold.alpha",
    "0.5",
    "--gold.kl_coef",
    "2.0",
    "--gold.teacher.backend",
    "vllm",
    "--gold.teacher.num_gpus_per_replica",
    "2",
    "--gold.teacher.tensor_parallel_size",
    "2",
]


def openrlhf_parser() -> argparse.ArgumentParser:
    """OpenRLHF 0.11.2's own parser, built by running its inline statements from the installed source."""
    spec = importlib.util.find_spec("openrlhf")
    source_path = Path(spec.submodule_search_locations[0]) / "cli" / "train_ppo_ray.py"
    tree = ast.parse(source_path.read_text())
    main_block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and "__main__" in ast.unparse(node.test)
    )
    statements = []
    for statement in main_block.body:
        if "parse_args" in ast.unparse(statement):
            break
        statements.append(statement)
    namespace = {"argparse": argparse, "datetime": datetime}
    exec(compile(ast.Module(body=statements, type_ignores=[]), str(source_path), "exec"), namespace)
    return namespace["parser"]


def _signature(action: argparse.Action) -> tuple:
    default = action.default
    if action.dest == "logger.wandb.run_name":
        default = "<time-stamped>"
    return (
        tuple(action.option_strings),
        action.dest,
        type(action).__name__,
        default,
        getattr(action.type, "__name__", action.type),
        action.nargs,
        tuple(action.choices) if action.choices else None,
        action.const,
    )


def _options(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    return {
        a.option_strings[0]: _signature(a) for a in parser._actions if a.option_strings and a.dest != "help"
    }


OURS_ONLY_PREFIXES = ("--gold.", "--backend", "--dry_run", "--data.output_key")


def test_every_openrlhf_option_has_the_same_name_type_and_default():
    theirs = _options(openrlhf_parser())
    ours = _options(build_parser())
    assert len(theirs) > 150
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"launcher lacks OpenRLHF options: {missing}"
    # Two options are left unset by the launcher and filled at resolution: GOLD's reward-free defaults with
    # --gold.alpha 1, OpenRLHF's own (checked here against its parser) otherwise.
    for name in theirs:
        dest = theirs[name][1]
        if dest in OPENRLHF_DEFAULTS:
            assert theirs[name][3] == OPENRLHF_DEFAULTS[dest] and ours[name][3] is None, name
            ours[name] = ours[name][:3] + (theirs[name][3],) + ours[name][4:]
    different = {name: (ours[name], theirs[name]) for name in theirs if ours[name] != theirs[name]}
    assert not different, f"options that differ from OpenRLHF's: {different}"
    extra = sorted(name for name in set(ours) - set(theirs) if not name.startswith(OURS_ONLY_PREFIXES))
    assert not extra, f"launcher options OpenRLHF does not have: {extra}"


def _parse_ours(argv: list[str]) -> dict:
    namespace = build_parser().parse_args(argv)
    fill_gold_defaults(namespace, getattr(namespace, "gold.alpha"))
    parsed = vars(namespace)
    return {
        k: v
        for k, v in parsed.items()
        if not k.startswith(OURS_ONLY_PREFIXES[0][2:]) and k not in ("backend", "dry_run", "data.output_key")
    }


@pytest.mark.parametrize("script", sorted(EXAMPLE_SCRIPTS))
def test_openrlhf_example_scripts_parse_exactly_as_openrlhf_parses_them(script):
    argv = EXAMPLE_SCRIPTS[script].split()
    theirs = vars(openrlhf_parser().parse_args(argv))
    ours = _parse_ours(argv + GOLD_OPTIONS + ["--dry_run"])
    theirs.pop("logger.wandb.run_name")
    ours.pop("logger.wandb.run_name")
    assert ours == theirs
    full = build_parser().parse_args(argv + GOLD_OPTIONS + ["--dry_run"])
    assert full.dry_run is True
    assert getattr(full, "gold.alpha") == 0.5 and getattr(full, "gold.teacher.backend") == "vllm"


def _argv(extra: str = "", alpha: str = "1.0") -> list[str]:
    base = (
        "--actor.model_name_or_path /nonexistent/student --gold.teacher.model_name_or_path /nonexistent/teacher "
        "--data.prompt_dataset /nonexistent/prompts.jsonl --algo.advantage.estimator group_norm "
        "--rollout.n_samples_per_prompt 4 --algo.kl.init_coef 0 --vllm.num_engines 1 "
        f"--gold.alpha {alpha} "
    )
    return (base + extra).split()


def _plan(argv: list[str]):
    return resolve_launch(build_parser().parse_args(argv))


def test_prorl_script_as_a_gold_mix_resolves_to_the_expected_layout():
    argv = PRORL_V2_GRPO.split() + [
        "--gold.teacher.model_name_or_path",
        "/models/teacher",
        "--gold.alpha",
        "0.5",
    ]
    # The script packs samples: the default signal (the logit loss) refuses, naming what to change.
    with pytest.raises(GoldConfigError, match="--ds.packing_samples.*--gold.signal advantage"):
        _plan(argv)
    plan = _plan(argv + ["--gold.signal", "advantage"])
    assert plan.reward_source == "reward function file /work/math_reward_func.py"
    assert not plan.create_reward_model_group  # the reward comes from the function, not a model
    assert plan.create_reference_group  # --algo.kl.init_coef 1e-4
    assert plan.teacher_colocated  # --train.colocate_all: placed like the reference model
    names = [g.name for g in plan.groups]
    assert names == ["actor", "reference", "vllm", "teacher"]
    assert plan.args.ds.packing_samples and plan.args.reward.remote_url == ["/work/math_reward_func.py"]


def test_reward_free_run_creates_no_reward_group_and_drops_reward_sources():
    plan = _plan(_argv("--reward.remote_url /work/reward.py --reward.model_name_or_path /models/rm"))
    assert not plan.create_reward_model_group and plan.reward_source is None
    assert plan.args.reward.remote_url is None and plan.args.reward.model_name_or_path is None
    assert any("reward-free" in w for w in plan.warnings)
    assert not plan.create_reference_group
    assert [g.name for g in plan.groups] == ["actor", "vllm", "teacher"]


def test_reference_model_only_when_kl_to_reference_is_asked_for():
    with_kl = _plan(_argv("--algo.kl.init_coef 0.001 --algo.kl.use_loss"))
    assert with_kl.create_reference_group
    assert not _plan(_argv()).create_reference_group


@pytest.mark.parametrize(
    ("extra", "alpha", "message"),
    [
        ("", "0.5", "no reward source is set"),
        ("--gold.signal logit --gold.teacher.topk 8 --ds.packing_samples", "1.0", "--ds.packing_samples"),
        (
            "--gold.signal both --gold.teacher.topk 8 --train.dynamic_batch_enable",
            "1.0",
            "dynamic_batch_enable",
        ),
        ("--gold.signal logit --gold.teacher.topk 8 --ds.ring_attn_size 2", "1.0", "ring_attn_size"),
        ("--gold.signal logit --gold.teacher.topk 0", "1.0", "--gold.teacher.topk"),
        ("--ds.packing_samples", "1.0", "--ds.packing_samples"),  # the default signal is the logit loss
        ("--algo.advantage.estimator gae", "1.0", "critic-free estimator"),
        ("--algo.kl.init_coef 0.01", "1.0", "--algo.kl.use_loss"),
        ("--gold.lmbda 0.5", "1.0", "--data.output_key"),
        (
            "--gold.lmbda 0.5 --gold.off_policy_source reference_or_teacher",
            "1.0",
            "--gold.off_policy_source teacher",
        ),
        ("--gold.off_policy_source teacher", "1.0", "--gold.lmbda < 1"),
        ("--algo.dynamic_filtering_enable", "1.0", "reward-free"),
        (
            "--algo.advantage.estimator rloo --rollout.n_samples_per_prompt 1",
            "1.0",
            "n_samples_per_prompt > 1",
        ),
        ("--train.colocate_all --gold.teacher.num_replicas 16", "1.0", "num_replicas"),
    ],
)
def test_impossible_combinations_fail_with_what_to_change(extra, alpha, message):
    with pytest.raises(GoldConfigError) as err:
        _plan(_argv(extra, alpha))
    assert message in str(err.value)


def test_teacher_written_off_policy_completions_need_no_dataset_completions():
    plan = _plan(_argv("--gold.lmbda 0.5 --gold.off_policy_source teacher"))
    assert (
        plan.gold.teacher_generates and not plan.gold.needs_references and plan.args.data.output_key is None
    )


def test_the_shortest_command_runs_with_golds_reward_free_defaults_and_given_options_win():
    shortest = [
        "--actor.model_name_or_path",
        "/nonexistent/student",
        "--gold.teacher.model_name_or_path",
        "/nonexistent/teacher",
        "--data.prompt_dataset",
        "/nonexistent/prompts.jsonl",
    ]
    plan = _plan(shortest)
    assert plan.args.algo.advantage.estimator == "reinforce" and plan.args.algo.kl.init_coef == 0.0
    assert not plan.create_reference_group and not plan.create_critic_group
    assert plan.filled_defaults == {"algo.advantage.estimator": "reinforce", "algo.kl.init_coef": 0.0}
    out = io.StringIO()
    run_dry_run(plan, out)
    assert "Defaults (GOLD's reward-free, not given on the command line)" in out.getvalue()
    given = _plan(shortest + ["--algo.advantage.estimator", "rloo", "--rollout.n_samples_per_prompt", "2"])
    assert (
        given.args.algo.advantage.estimator == "rloo"
        and "algo.advantage.estimator" not in given.filled_defaults
    )
    mixed = _plan(shortest + ["--gold.alpha", "0.5", "--reward.remote_url", "http://rm:5000/get_reward"])
    assert mixed.args.algo.kl.init_coef == 0.01 and mixed.args.algo.advantage.estimator == "gae"
    help_text = build_parser().format_help()
    assert "GOLD's default: reinforce for a reward-" in " ".join(
        help_text.split()
    )  # argparse wraps at the hyphen


def test_alpha_below_one_accepts_each_reward_source():
    for source in ("--reward.model_name_or_path /models/rm", "--reward.remote_url http://rm:5000/get_reward"):
        plan = _plan(_argv(source, alpha="0.5"))
        assert plan.reward_source is not None
    assert _plan(_argv("--reward.model_name_or_path /models/rm", alpha="0.5")).create_reward_model_group


def test_cli_reports_config_errors_as_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_argv("", alpha="0.5") + ["--dry_run"])
    assert exit_info.value.code == 2
    assert "no reward source is set" in capsys.readouterr().err


def test_dry_run_checks_real_tokenizers_and_prints_the_vocabulary_map(capsys):
    from gold_plugin.packaged_tokenizers import tokenizer_dir

    student, teacher = tokenizer_dir("qwen"), tokenizer_dir("mistral")
    argv = _argv() + ["--dry_run"]
    argv[argv.index("/nonexistent/student")] = str(student)
    argv[argv.index("/nonexistent/teacher")] = str(teacher)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "byte-mappable" in out and "vocabulary map:" in out
    resolved = json.loads(out[out.index("{") : out.rindex("}") + 1].split("\nstudent tokenizer")[0])
    assert resolved["gold"]["alpha"] == 1.0 and resolved["openrlhf"]["actor"]["model_name_or_path"] == str(
        student
    )


def test_dry_run_refuses_a_teacher_tokenizer_that_cannot_be_mapped_to_bytes(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "wordpiece")
    argv = _argv()
    argv[argv.index("/nonexistent/teacher")] = str(tmp_path / "wordpiece")
    plan = _plan(argv)
    with pytest.raises(GoldConfigError, match="cannot be mapped to bytes"):
        run_dry_run(plan, io.StringIO())


def test_dry_run_only_warns_about_paths_it_cannot_see(capsys):
    assert cli.main(_argv() + ["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: student tokenizer '/nonexistent/student' is not a local path here" in out
    assert "teacher      1 x 1 GPU" in out.replace("teacher    ", "teacher      ")


def _fake_backends(monkeypatch) -> list[tuple[str, list[str]]]:
    """Replace both backends' command lines by recorders of (backend, argv)."""
    received: list[tuple[str, list[str]]] = []
    for name, module in (
        ("openrlhf", "gold_plugin.integrations.openrlhf.cli"),
        ("local", "gold_plugin.local.cli"),
    ):
        fake = types.ModuleType(module)
        fake.main = lambda argv, parents=(), name=name: received.append((name, list(argv))) or 0
        monkeypatch.setitem(sys.modules, module, fake)
    return received


def test_backend_local_delegates_before_parsing_openrlhf_options(monkeypatch):
    received = _fake_backends(monkeypatch)
    # --not-an-openrlhf-option would make the OpenRLHF parser exit: it must never see it.
    assert front_door.main(["--backend", "local", "--not-an-openrlhf-option", "3"]) == 0
    assert front_door.main(["--backend=local", "--demo"]) == 0
    assert received == [("local", ["--not-an-openrlhf-option", "3"]), ("local", ["--demo"])]


def test_the_front_door_runs_the_openrlhf_backend_by_default(monkeypatch, capsys):
    received = _fake_backends(monkeypatch)
    assert front_door.main(["--actor.model_name_or_path", "s", "--dry_run"]) == 0
    assert front_door.main(["--dry_run", "--backend", "openrlhf"]) == 0
    assert received == [
        ("openrlhf", ["--actor.model_name_or_path", "s", "--dry_run"]),
        ("openrlhf", ["--dry_run"]),
    ]
    with pytest.raises(SystemExit) as err:
        front_door.main(["--backend", "slurm"])
    assert err.value.code == 2 and "invalid choice: 'slurm'" in capsys.readouterr().err
    assert set(front_door.BACKENDS) == {"openrlhf", "local"} and front_door.DEFAULT_BACKEND == "openrlhf"


HEAVY = ("openrlhf", "deepspeed", "vllm", "ray", "flash_attn")


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_help_and_dry_run_import_no_cluster_packages():
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['train_gold.py'] + {_argv() + ['--dry_run']!r}\n"
        "try:\n"
        f"    runpy.run_path({str(LAUNCHER)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    helped = subprocess.run(
        [sys.executable, str(LAUNCHER), "--help"], capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0, helped.stderr
    for group in (
        "GOLD distillation (--gold.*)",
        "GOLD teacher (--gold.teacher.*)",
        "OpenRLHF: vLLM rollout engines",
    ):
        assert group in helped.stdout
    assert (
        "--gold.teacher.model_name_or_path" in helped.stdout and "--algo.advantage.estimator" in helped.stdout
    )
    words = " ".join(helped.stdout.split())  # argparse wraps lines
    assert "--backend {openrlhf,local}" in words and "(its own options: `--backend local --help`)" in words


def test_nest_namespace_matches_openrlhf_hierarchize():
    from openrlhf.utils.config import hierarchize

    args = build_parser().parse_args(_argv())
    assert nest_namespace(args) == hierarchize(args)


def test_help_and_dry_run_work_with_the_standard_library_only():
    """`python -S` hides site-packages: what a fresh environment without torch/numpy/transformers has."""
    for extra in (["--help"], _argv() + ["--dry_run"]):
        result = subprocess.run(
            [sys.executable, "-S", str(LAUNCHER), *extra],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
        assert result.returncode == 0, result.stderr
        assert "--gold.alpha" in result.stdout or "options are valid" in result.stdout


def test_real_run_refuses_an_unmappable_tokenizer_before_starting_ray(tmp_path, monkeypatch, capsys):
    from transformers import BertTokenizerFast

    from gold_plugin.integrations.openrlhf import train as train_module

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "##s"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "wordpiece")
    monkeypatch.setattr(train_module, "train", lambda plan: pytest.fail("train() must not start"))
    argv = _argv()
    argv[argv.index("/nonexistent/teacher")] = str(tmp_path / "wordpiece")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "cannot be mapped to bytes" in capsys.readouterr().err


def test_dry_run_reports_the_vocabulary_map_shares():
    from gold_plugin.alignment import VocabMap
    from gold_plugin.packaged_tokenizers import load_packaged_tokenizer, tokenizer_dir

    argv = _argv()
    argv[argv.index("/nonexistent/student")] = str(tokenizer_dir("mistral"))
    argv[argv.index("/nonexistent/teacher")] = str(tokenizer_dir("gpt2"))
    out = io.StringIO()
    report = run_dry_run(_plan(argv), out)
    expected = VocabMap(load_packaged_tokenizer("mistral"), load_packaged_tokenizer("gpt2"))
    assert report.student_checked and report.teacher_checked and report.same_vocabulary is False
    assert report.student_matched_fraction == pytest.approx(expected.student_matched_fraction)
    assert 0.6 < report.student_matched_fraction < 0.7  # docs/results.md: bytes match ~66% of Mistral-v1
    assert f"student {expected.student_matched_fraction:.1%}" in out.getvalue()

    argv[argv.index(str(tokenizer_dir("gpt2")))] = str(tokenizer_dir("mistral"))
    assert run_dry_run(_plan(argv), io.StringIO()).same_vocabulary is True


def test_the_hidden_state_loss_runs_with_the_hf_teacher_and_is_refused_with_the_vllm_teacher():
    plan = _plan(_argv("--gold.signal hidden"))
    assert plan.gold.uses_hidden_states and plan.gold.teacher.backend == "hf"
    assert plan.gold.teacher.hidden_state_layers == 2
    assert _plan(_argv("--gold.signal logit --gold.hidden_state_coef 0.5")).gold.uses_hidden_states
    with pytest.raises(GoldConfigError, match="needs --gold.teacher.backend hf"):
        _plan(_argv("--gold.signal hidden --gold.teacher.backend vllm"))
    with pytest.raises(GoldConfigError, match="hidden-state loss.*packs samples into one row"):
        _plan(_argv("--gold.signal hidden --ds.packing_samples"))


def test_dry_run_refuses_chat_prompts_for_a_teacher_without_a_chat_template(tmp_path, capsys):
    """A base teacher (no chat template) with chat prompts would reject every request: the dry run says so and
    names both ways out; text prompts, or --gold.teacher.chat_template student, pass."""
    from gold_plugin.packaged_tokenizers import load_packaged_tokenizer, tokenizer_dir

    base = copy.deepcopy(load_packaged_tokenizer("gpt2"))  # the loaded tokenizer is shared: change a copy
    base.chat_template = None
    base.save_pretrained(tmp_path / "base_teacher")
    argv = _argv()
    argv[argv.index("/nonexistent/student")] = str(tokenizer_dir("mistral"))
    argv[argv.index("/nonexistent/teacher")] = str(tmp_path / "base_teacher")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--data.apply_chat_template", "--dry_run"])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"The teacher tokenizer '{tmp_path / 'base_teacher'}' has no chat template" in err
    assert "--gold.teacher.chat_template student" in err and "--gold.teacher.tokenizer_name_or_path" in err
    for fine in ([], ["--data.apply_chat_template", "--gold.teacher.chat_template", "student"]):
        assert cli.main([*argv, *fine, "--dry_run"]) == 0


def test_the_console_script_is_the_launcher():
    script = Path(sys.executable).parent / "gold-train"
    ours = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    launcher = subprocess.run(
        [sys.executable, str(LAUNCHER), "--help"], capture_output=True, text=True, timeout=120
    )
    assert ours.returncode == 0 and "--gold.teacher.model_name_or_path" in ours.stdout
    assert ours.stdout.replace("gold-train", "train_gold.py") == launcher.stdout
