"""Raw chat prompts for the teacher's own template, and reference completions for ``--gold.lmbda < 1``.

OpenRLHF's rollouts carry only the student-templated prompt string. To render the teacher's chat template we keep
a lookup ``templated prompt -> raw messages``, and for off-policy samples a lookup ``templated prompt -> reference
completion`` (``--data.output_key``), both built from the same dataset rows with OpenRLHF's own
``preprocess_data`` (so the keys are exactly the strings the rollouts carry).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from gold_plugin.teacher.types import ChatMessages

if TYPE_CHECKING:
    from datasets import Dataset
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    from gold_plugin.alignment.types import ChatTokenizer


def build_prompt_lookup(
    rows: Iterable[Mapping[str, Any]], tokenizer: ChatTokenizer, data_args: argparse.Namespace
) -> dict[str, ChatMessages]:
    """``{student prompt string: raw messages}`` for ``rows``, rendered exactly as OpenRLHF's PromptDataset does.

    ``data_args`` is ``args.data`` (``input_key``, ``label_key``, ``input_template``, ``apply_chat_template``).
    Rows whose prompt cannot be read as messages are skipped (the experience maker then falls back to the
    student's prompt text for them and counts it).
    """
    from openrlhf.datasets.prompts_dataset import preprocess_data

    from gold_plugin.step import chat_messages

    apply_chat_template = (
        tokenizer.apply_chat_template if getattr(data_args, "apply_chat_template", False) else None
    )
    input_key = getattr(data_args, "input_key", "input")
    template = getattr(data_args, "input_template", None)
    lookup: dict[str, ChatMessages] = {}
    for row in rows:
        messages = chat_messages(row.get(input_key))
        if messages is None:
            continue
        prompt, _ = preprocess_data(row, template, input_key, None, apply_chat_template)
        lookup[prompt] = messages
    return lookup


def build_reference_lookup(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: ChatTokenizer,
    data_args: argparse.Namespace,
    output_key: str,
) -> dict[str, str]:
    """``{student prompt string: reference completion}`` for the rows that have one under ``output_key`` (a string,
    or chat messages whose last content is taken); rows without one are left out (trained on-policy)."""
    from openrlhf.datasets.prompts_dataset import preprocess_data

    from gold_plugin.step import reference_text

    apply_chat_template = (
        tokenizer.apply_chat_template if getattr(data_args, "apply_chat_template", False) else None
    )
    input_key = getattr(data_args, "input_key", "input")
    template = getattr(data_args, "input_template", None)
    lookup: dict[str, str] = {}
    for row in rows:
        reference = reference_text(row.get(output_key))
        if reference is None or input_key not in row:
            continue
        prompt, _ = preprocess_data(row, template, input_key, None, apply_chat_template)
        lookup[prompt] = reference
    return lookup


def load_prompt_rows(strategy: DeepspeedStrategy) -> Dataset:
    """The training prompt rows, loaded as OpenRLHF's ``prepare_datasets`` loads them."""
    from openrlhf.datasets.utils import blending_datasets

    args = strategy.args
    data = blending_datasets(
        args.data.prompt_dataset,
        args.data.prompt_probs,
        strategy,
        args.train.seed,
        max_count=args.data.max_samples,
        dataset_split=args.data.prompt_split,
    )
    return data.select(range(min(args.data.max_samples, len(data))))


def load_prompt_lookup(strategy: DeepspeedStrategy, tokenizer: ChatTokenizer) -> dict[str, ChatMessages]:
    """Load the training prompts as OpenRLHF does and build the raw-messages lookup."""
    return build_prompt_lookup(load_prompt_rows(strategy), tokenizer, strategy.args.data)


def load_reference_lookup(strategy: DeepspeedStrategy, tokenizer: ChatTokenizer) -> dict[str, str]:
    """Load the training prompts as OpenRLHF does and build the reference-completion lookup."""
    args = strategy.args
    return build_reference_lookup(load_prompt_rows(strategy), tokenizer, args.data, args.data.output_key)
