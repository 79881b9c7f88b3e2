"""Prompt datasets checked before a run starts: a bad line stops the run at start with the file, the line and the fix,
never with a traceback mid-run (both backends; docs/openrlhf.md, "Faults and what they get").

Only local ``.jsonl`` / ``.json`` files are read here; a hub dataset is left to its loader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from gold_plugin.config import GoldConfigError

LOCAL_SUFFIXES = (".jsonl", ".json")


def read_rows(path: str, option: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a ``.jsonl`` (one JSON object per non-blank line) or ``.json`` (a list of objects) file, and the
    line (``.jsonl``) or item number (``.json``) of each.

    Raises :class:`GoldConfigError` naming ``--option``, the file and the line of the first row that is not a JSON
    object, and what to do about it.
    """
    if not os.path.isfile(path):
        raise GoldConfigError(f"--{option} {path!r}: no such file.")
    rows: list[tuple[int, Any]] = []
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise GoldConfigError(
                        f"--{option} {path}, line {number}: not JSON ({error.msg}, column {error.colno}). Fix the "
                        "line or delete it: every line of a .jsonl file is one JSON object."
                    ) from None
        else:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                raise GoldConfigError(
                    f"--{option} {path}, line {error.lineno}: not JSON ({error.msg}, column {error.colno})."
                ) from None
            if not isinstance(data, list):
                raise GoldConfigError(f"--{option} {path}: a .json dataset must be a list of objects.")
            rows = [(index + 1, row) for index, row in enumerate(data)]
    for number, row in rows:
        if not isinstance(row, dict):
            where = "line" if path.endswith(".jsonl") else "item"
            raise GoldConfigError(
                f"--{option} {path}, {where} {number}: a JSON {type(row).__name__}, not an object with the prompt "
                "under --data.input_key."
            )
    return [row for _, row in rows], [number for number, _ in rows]


def check_prompts(
    rows: Sequence[dict[str, Any]],
    path: str,
    input_key: str,
    option: str,
    lines: Sequence[int] | None = None,
) -> None:
    """Every row holds a non-empty prompt under ``input_key`` (text, or chat messages); else raise naming the row
    (``lines[i]``, its line in the file, when given) and the fix."""
    for index, row in enumerate(rows):
        where = f"line {lines[index]}" if lines is not None else f"row {index + 1}"
        value = row.get(input_key)
        if value is None:
            raise GoldConfigError(
                f"--{option} {path}, {where}: no {input_key!r} key (its keys: {sorted(row)}). Set "
                "--data.input_key to the key that holds the prompt, or fix the row."
            )
        if not isinstance(value, (str, list)) or not value:
            raise GoldConfigError(
                f"--{option} {path}, {where}: {input_key!r} is {value!r}; a prompt is a non-empty string "
                "or a list of chat messages. Fix the row or delete it."
            )


def check_local_datasets(sources: str | None, input_key: str, option: str = "data.prompt_dataset") -> int:
    """Check every local file among OpenRLHF's comma-separated ``--data.prompt_dataset`` sources that exists here
    (a path on the cluster's storage or a hub name is left to OpenRLHF's loader); returns how many were checked."""
    checked = 0
    for source in (sources or "").split(","):
        source = source.strip()
        if source.endswith(LOCAL_SUFFIXES) and os.path.isfile(source):
            rows, lines = read_rows(source, option)
            check_prompts(rows, source, input_key, option, lines)
            checked += 1
    return checked
