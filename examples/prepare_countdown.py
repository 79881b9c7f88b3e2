"""Write the Countdown prompts as the JSONL that the GOLD examples read.

    python examples/prepare_countdown.py --out /shared/data/countdown_train.jsonl [--max_samples 20000]

Each line: ``{"prompt": [{"role": "user", "content": ...}], "label": "{\"target\": 24, \"nums\": [...]}"}``.
Use it with ``--data.prompt_dataset <out> --data.input_key prompt --data.label_key label
--data.apply_chat_template``: the student's template renders the prompt for vLLM, and GOLD renders the same raw
messages with the teacher's own template. Source: the ``Jiayi-Pan/Countdown-Tasks-3to4`` dataset (``target``,
``nums``), as in TinyZero.
"""

from __future__ import annotations

import argparse
import json

INSTRUCTION = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use +, -, * and /, and each "
    "number must be used exactly once. Think it through, then give only the final equation inside "
    "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)


def countdown_record(target: int, nums: list[int]) -> dict:
    """One prompt line (raw chat messages + JSON label)."""
    content = INSTRUCTION.format(nums=list(nums), target=target)
    return {
        "prompt": [{"role": "user", "content": content}],
        "label": json.dumps({"target": int(target), "nums": [int(n) for n in nums]}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--dataset", default="Jiayi-Pan/Countdown-Tasks-3to4")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_samples", type=int, default=20000)
    args = parser.parse_args()

    from datasets import load_dataset

    rows = load_dataset(args.dataset, split=args.split)
    with open(args.out, "w") as handle:
        for row in rows.select(range(min(args.max_samples, len(rows)))):
            handle.write(json.dumps(countdown_record(row["target"], row["nums"])) + "\n")


if __name__ == "__main__":
    main()
