"""The example scripts: their launcher options validate (--dry_run), and the Countdown reward checks answers."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gold_plugin.integrations.openrlhf.args import build_parser
from gold_plugin.integrations.openrlhf.launch_plan import resolve_launch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.sh"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launcher_argv(script: Path) -> list[str]:
    """The options a script passes to launchers/train_gold.py, with its default environment values."""
    text = script.read_text()
    defaults = dict(
        line.split("=${", 1)[0:1] + [line.split(":-", 1)[1].rstrip("}")]
        for line in text.splitlines()
        if "=${" in line and ":-" in line and not line.startswith("#")
    )
    command = text[
        text.index("launchers/train_gold.py") + len("launchers/train_gold.py") : text.index('"$@"')
    ]
    command = command.replace("\\\n", " ")
    for name, value in defaults.items():
        command = command.replace(f'"${name}"', value)
    return shlex.split(command)


def test_there_are_the_three_documented_examples():
    names = {s.name for s in SCRIPTS}
    assert {
        "gold_countdown_qwen3_4b_to_llama3_1b.sh",
        "gold_grpo_countdown_mix.sh",
        "gold_same_tokenizer_qwen3_8b_to_1p7b.sh",
    } <= names
    for script in SCRIPTS:
        assert "# GPUs:" in script.read_text(), f"{script.name} must state the GPUs it expects"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_options_resolve(script):
    plan = resolve_launch(build_parser().parse_args(_launcher_argv(script)))
    gpus = sum(g.replicas * g.gpus_per_replica for g in plan.groups if g.placement == "own GPUs")
    gpus += plan.args.actor.num_nodes * plan.args.actor.num_gpus_per_node if plan.teacher_colocated else 0
    assert gpus <= 8  # every example states one node with 8 GPUs
    if script.name == "gold_grpo_countdown_mix.sh":
        assert plan.gold.alpha == 0.5 and plan.args.reward.remote_url == ["examples/countdown_reward.py"]
        assert plan.create_reference_group and not plan.create_reward_model_group
    else:
        assert (
            plan.gold.alpha == 1.0 and not plan.create_reward_model_group and not plan.create_reference_group
        )


def test_example_script_dry_run_runs_end_to_end():
    script = EXAMPLES / "gold_grpo_countdown_mix.sh"
    result = subprocess.run(
        ["bash", str(script), "--dry_run"],
        capture_output=True,
        text=True,
        timeout=180,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "options are valid" in result.stdout and "teacher    2 x 0.2 GPU" in result.stdout


@pytest.mark.parametrize(
    ("response", "reward", "format_ok"),
    [
        ("Let me try. <answer> (6 - 4) * (1 + 11) </answer>", 1.0, True),
        ("<answer>(11+1)*(6-4)</answer> done", 1.0, True),
        ("<answer> (6 - 4) * (1 + 11) = 24 </answer>", 1.0, True),
        ("<answer> 6 * 4 </answer>", 0.0, True),  # right value, numbers not all used
        ("<answer> (6 - 4) * 12 </answer>", 0.0, True),  # 12 is not a given number
        ("<answer> __import__('os') </answer>", 0.0, True),  # never evaluated
        ("<answer> 6 / (4 - 4) </answer>", 0.0, True),
        ("no tags (6 - 4) * (1 + 11)", 0.0, False),
        (
            "<answer> 1 </answer> then <answer> (6 - 4) * (1 + 11) </answer>",
            1.0,
            True,
        ),  # the last answer counts
    ],
)
def test_countdown_score(response, reward, format_ok):
    countdown = _load("countdown_reward")
    assert countdown.countdown_score(response, 24, [6, 4, 1, 11]) == (reward, format_ok)


def test_countdown_reward_func_in_openrlhf_format():
    countdown, prepare = _load("countdown_reward"), _load("prepare_countdown")
    record = prepare.countdown_record(24, [6, 4, 1, 11])
    assert record["prompt"][0]["role"] == "user" and "<answer>" in record["prompt"][0]["content"]
    prompt = "<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n"
    good, bad = prompt + "<answer> (6-4)*(1+11) </answer><|im_end|>", prompt + "<answer> 24 </answer>"
    single = countdown.reward_func([good], [prompt], [record["label"]])
    assert (
        single["rewards"] == 1.0
        and single["scores"] == 1.0
        and single["extra_logs"]["answer_format_ok"] == 1.0
    )
    batch = countdown.reward_func(
        [good, bad], [prompt, prompt], [record["label"], json.loads(record["label"])]
    )
    assert batch["rewards"].tolist() == [1.0, 0.0]
