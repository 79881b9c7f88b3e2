"""Countdown reward for OpenRLHF's ``--reward.remote_url path/to/countdown_reward.py`` (reward_func format).

OpenRLHF 0.11 loads this file on every vLLM rollout actor and calls ``reward_func(queries, prompts, labels)``
with the full decoded text (prompt + response), the prompt and the dataset label of each sample; it reads
``rewards`` (used for advantages), ``scores`` (dynamic filtering) and ``extra_logs`` (logged) from the returned
dict. Labels are the JSON written by ``examples/prepare_countdown.py``: ``{"target": 24, "nums": [4, 6, 1, 1]}``.

A response earns 1.0 when its last ``<answer> ... </answer>`` holds an arithmetic expression (+ - * / and
parentheses) that uses every given number exactly once and evaluates to the target; else 0.0. The expression is
evaluated from its syntax tree, never with ``eval``.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from fractions import Fraction

import torch

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class InvalidExpression(ValueError):
    """Not a plain arithmetic expression over integer literals."""


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise InvalidExpression("division by zero")
        return _OPERATORS[type(node.op)](left, right)
    raise InvalidExpression(f"unsupported syntax: {type(node).__name__}")


def countdown_score(response: str, target: int, nums: list[int]) -> tuple[float, bool]:
    """(reward, format_ok) for one response."""
    answers = _ANSWER.findall(response)
    if not answers:
        return 0.0, False
    expression = answers[-1].strip().replace("×", "*").replace("÷", "/")
    if "=" in expression:  # "(4 + 6) * 1 * 1 = 10": keep the left-hand side
        expression = expression.split("=")[0]
    try:
        used: list[int] = []
        value = _evaluate(ast.parse(expression, mode="eval"), used)
    except (SyntaxError, InvalidExpression, RecursionError):
        return 0.0, True
    correct = Counter(used) == Counter(nums) and value == target
    return (1.0 if correct else 0.0), True


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **kwargs) -> dict:
    """OpenRLHF reward function: one reward per query."""
    rewards, formats = [], []
    for query, prompt, label in zip(queries, prompts, labels):
        task = json.loads(label) if isinstance(label, str) else label
        response = query[len(prompt) :] if query.startswith(prompt) else query.split("assistant", 1)[-1]
        reward, format_ok = countdown_score(response, int(task["target"]), [int(n) for n in task["nums"]])
        rewards.append(reward)
        formats.append(float(format_ok))
    if len(rewards) == 1:  # OpenRLHF 0.11 calls with one query and stores the values as per-sample scalars
        return {"rewards": rewards[0], "scores": rewards[0], "extra_logs": {"answer_format_ok": formats[0]}}
    values = torch.tensor(rewards)
    return {
        "rewards": values,
        "scores": values.clone(),
        "extra_logs": {"answer_format_ok": torch.tensor(formats)},
    }
