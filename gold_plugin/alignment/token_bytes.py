"""Canonical bytes of every token id: what the token contributes to the UTF-8 text.

Supported tokenizer families (docs/design.md, "Token bytes"):

- byte-level BPE (GPT-2, Qwen, Llama-3, ...): each character of a token string stands for one byte through
  the GPT-2 bytes-to-unicode table;
- SentencePiece (Llama-2, Mistral v1, Gemma, ...): ``▁`` is a space and ``<0xNN>`` (byte fallback) is the
  single byte NN; every other character is its UTF-8 encoding.

Special and added control tokens (EOS, end-of-turn, pad, BOS, unk) are zero-width (``b""``). A tokenizer of
any other kind (WordPiece, which drops spaces, or anything whose tokens cannot be mapped back to bytes) is
refused with :class:`UnsupportedTokenizerError`; nothing silently degrades.

Dummy-prefix rule. A SentencePiece tokenizer prepends a space to a text that does not start with one, so
``tokenizer.encode("Hello")`` has the bytes ``b" Hello"``, and ``decode`` drops a leading space. The response
text is therefore always built from canonical bytes (:func:`text_for_teacher`), never from ``decode``, and
the teacher tokenises it with :func:`encode_continuation`, which never adds that space: then the teacher's
bytes equal the student's exactly. :func:`~gold_plugin.alignment.align` additionally tolerates one dummy-prefix
space at the start of either side when that side's tokenizer adds one (plain ``encode``).

Tables are built once per tokenizer object (about 0.5 s for a 150k vocabulary) and cached while the object
lives. Adding tokens to a tokenizer after its first use needs :func:`clear_token_bytes_cache`.
"""

from __future__ import annotations

import functools
import json
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias, cast

import numpy as np

from gold_plugin.alignment.types import TokenIds, Tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer as RustTokenizer

SPIECE_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class UnsupportedTokenizerError(ValueError):
    """The tokenizer's tokens cannot be mapped to the bytes of the text (e.g. WordPiece)."""


@functools.cache
def _byte_level_decoder_table() -> dict[int, str]:
    """``str.translate`` table from the GPT-2 byte-level alphabet back to ``chr(byte)`` (latin-1 code points)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_values = list(printable)
    code_points = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return {code_point: chr(byte) for byte, code_point in zip(byte_values, code_points, strict=True)}


@dataclass(eq=False)
class TokenTable:
    """Per-tokenizer tables derived once: canonical bytes, their lengths and which ids are special."""

    name: str
    kind: str  # "byte_level" or "sentencepiece"
    token_bytes: list[bytes]
    byte_lengths: np.ndarray  # int64 [vocab]
    special: np.ndarray  # bool [vocab]: special / added control tokens (zero-width)
    byte_fallback: np.ndarray  # bool [vocab]: SentencePiece <0xNN> pieces
    adds_prefix_space: bool
    fingerprint: int = 0
    _continuation_backend: RustTokenizer | bool | None = field(default=None, repr=False)
    """The Rust tokenizer that encodes continuations (False: a slow tokenizer; None: not built yet)."""

    def __len__(self) -> int:
        return len(self.token_bytes)

    @functools.cached_property
    def flat_bytes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(buffer uint8, start int64 [vocab])``: every token's bytes, concatenated, for vectorised gathers."""
        buffer = np.frombuffer(b"".join(self.token_bytes), dtype=np.uint8)
        starts = np.cumsum(self.byte_lengths) - self.byte_lengths
        return buffer, starts

    @functools.cached_property
    def poly_hash(self) -> np.ndarray:
        """``uint64 [vocab]``: each token's bytes as the polynomial ``sum_k (b_k + 1) * BASE^k`` (mod 2**64).

        The hash of a concatenation is ``sum_tokens hash(token) * BASE^start``, so a whole response's bytes can
        be compared with the other tokenizer's in a few vectorised passes over its tokens rather than its bytes.
        """
        buffer, starts = self.flat_bytes
        position = np.arange(buffer.size, dtype=np.int64) - np.repeat(starts, self.byte_lengths)
        powers = hash_powers(int(self.byte_lengths.max(initial=0)) + 1)
        values = (buffer.astype(np.uint64) + np.uint64(1)) * powers[position]
        cumulative = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(values)])
        return cumulative[starts + self.byte_lengths] - cumulative[starts]


# Odd 64-bit base of the byte-string hash (arithmetic wraps mod 2**64). Used only as a fast equality test of
# two tokenisations of the same text (lengths are compared exactly); a failing sample is re-checked byte by byte.
HASH_BASE = np.uint64(0x9E3779B97F4A7C15)
_POWERS = np.ones(1, dtype=np.uint64)


def hash_powers(size: int) -> np.ndarray:
    """``HASH_BASE**k mod 2**64`` for k < ``size`` (at least); grown by doubling and cached."""
    global _POWERS
    powers = _POWERS
    with np.errstate(over="ignore"):
        while powers.size < size:
            powers = np.concatenate([powers, powers * (powers[-1] * HASH_BASE)])
    _POWERS = powers
    return powers


TokenizerOrTable: TypeAlias = "Tokenizer | TokenTable"
"""A tokenizer, or the :class:`TokenTable` already built from one (every function that reads only the table)."""

_TABLES: dict[int, tuple[weakref.ref[Tokenizer] | Tokenizer, TokenTable]] = {}
# Caches of values derived from token tables (the vocabulary maps): cleared with the tables. Modules that build
# on this one register theirs (:func:`derived_cache`), so this module imports none of them.
_DERIVED_CACHES: list[dict] = []


def derived_cache() -> dict:
    """A new cache of values derived from token tables, emptied by :func:`clear_token_bytes_cache`."""
    cache: dict = {}
    _DERIVED_CACHES.append(cache)
    return cache


def clear_token_bytes_cache() -> None:
    """Forget every cached token table and everything derived from them (vocabulary maps)."""
    _TABLES.clear()
    for cache in _DERIVED_CACHES:
        cache.clear()


def tokenizer_name(tokenizer: Tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def token_table(tokenizer: TokenizerOrTable) -> TokenTable:
    """The cached :class:`TokenTable` of ``tokenizer`` (built on first use; identity-keyed)."""
    if isinstance(tokenizer, TokenTable):
        return tokenizer
    key = id(tokenizer)
    entry = _TABLES.get(key)
    if entry is not None:
        ref, table = entry
        if (ref() if isinstance(ref, weakref.ref) else ref) is tokenizer:
            return table
    table = _build_table(tokenizer)
    try:
        ref: weakref.ref[Tokenizer] | Tokenizer = weakref.ref(
            tokenizer, lambda _r, k=key: _TABLES.pop(k, None)
        )
    except TypeError:  # not weak-referenceable: keep it alive with the table
        ref = tokenizer
    _TABLES[key] = (ref, table)
    return table


def token_bytes(tokenizer: TokenizerOrTable) -> list[bytes]:
    """Canonical bytes of every id of ``tokenizer`` (``b""`` for special tokens); cached, do not mutate."""
    return token_table(tokenizer).token_bytes


def token_byte_lengths(tokenizer: TokenizerOrTable) -> np.ndarray:
    """``int64`` array: number of canonical bytes of every id (0 for special tokens); cached, read-only."""
    return token_table(tokenizer).byte_lengths


def ids_to_bytes(tokenizer: TokenizerOrTable, ids: TokenIds | Iterable[int]) -> bytes:
    """The UTF-8 bytes that ``ids`` contribute to the text (concatenated canonical bytes, not ``decode``).

    Raises ``ValueError`` naming the id for an id outside the tokenizer's vocabulary.
    """
    return _joined_bytes(token_table(tokenizer), _as_int_list(ids), skip_out_of_range=False)


def _joined_bytes(table: TokenTable, ids: list[int], skip_out_of_range: bool) -> bytes:
    token_bytes = table.token_bytes
    size = len(token_bytes)
    if ids and (min(ids) < 0 or max(ids) >= size):
        if not skip_out_of_range:
            bad = next(i for i in ids if not 0 <= i < size)
            raise ValueError(f"Token id {bad} is outside the vocabulary of {table.name!r} ({size} ids).")
        ids = [i for i in ids if 0 <= i < size]
    return b"".join([token_bytes[i] for i in ids])


def incomplete_utf8_tail_length(data: bytes) -> int:
    """Length (0..3) of a trailing strict prefix of a multi-byte UTF-8 character in ``data``."""
    n = len(data)
    for back in range(1, min(3, n) + 1):
        byte = data[n - back]
        if 0x80 <= byte < 0xC0:  # continuation byte: keep looking for the lead byte
            continue
        needed = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if 0xF0 <= byte < 0xF8 else 0
        return back if needed > back else 0
    return 0


def text_for_teacher(tokenizer: TokenizerOrTable, ids: TokenIds | Iterable[int]) -> str:
    """The response text to send to the teacher for the student's ``ids``.

    Built from canonical bytes (so a SentencePiece leading space is kept). A trailing incomplete UTF-8
    character (a response cut inside it) cannot be sent and is dropped; :func:`align` accepts that and masks
    the student tokens that cover it. Other invalid bytes become U+FFFD, which makes the sample unalignable
    (it then gets no signal) rather than silently misaligned. Never raises for a bad sample: ids outside the
    vocabulary (a model's padded embedding rows) contribute nothing, and :func:`align` reports such a sample
    unalignable.
    """
    data = _joined_bytes(token_table(tokenizer), _as_int_list(ids), skip_out_of_range=True)
    cut = incomplete_utf8_tail_length(data)
    return data[: len(data) - cut].decode("utf-8", errors="replace")


def adds_prefix_space(tokenizer: TokenizerOrTable) -> bool:
    """Whether ``tokenizer.encode(text)`` prepends a dummy space to a text that does not start with one."""
    return token_table(tokenizer).adds_prefix_space


def encode_continuation(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as a continuation of earlier text: no dummy-prefix space, and special-token
    strings typed in the text (``"<|im_end|>"``) are read as plain text, never as control tokens.

    Guarantee (byte-level BPE and SentencePiece tokenizers without a normaliser):
    ``ids_to_bytes(tokenizer, encode_continuation(tokenizer, text)) == text.encode("utf-8")``.
    """
    return encode_continuation_batch(tokenizer, [text])[0]


def encode_continuation_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """:func:`encode_continuation` for many texts (one batched call into the Rust tokenizer when available)."""
    table = token_table(tokenizer)
    if table._continuation_backend is None:
        table._continuation_backend = _continuation_backend(tokenizer, table.adds_prefix_space)
    backend = table._continuation_backend
    if backend is False:  # slow tokenizer
        return [_continuation_slow(tokenizer, table, text) for text in texts]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [list(enc.ids) for enc in encode(list(texts), add_special_tokens=False)]


def _continuation_slow(tokenizer: Tokenizer, table: TokenTable, text: str) -> list[int]:
    """Slow tokenizer: special-token strings as text; for a dummy-prefix tokenizer, encode after a space and
    drop that space's token."""

    def encode(value: str) -> list[int]:
        return list(tokenizer(value, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    if not table.adds_prefix_space or not text or text.startswith(" "):
        return encode(text)
    ids = encode(" " + text)
    if ids and table.token_bytes[ids[0]] == b" ":
        return ids[1:]
    raise UnsupportedTokenizerError(
        f"Cannot encode {text[:20]!r} without the dummy-prefix space with tokenizer {table.name!r}; "
        "use a fast (tokenizers-backed) tokenizer."
    )


def _encode_plain(tokenizer: Tokenizer, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _continuation_backend(tokenizer: Tokenizer, strip_prefix_space: bool) -> RustTokenizer | bool:
    """A copy of the tokenizer's Rust backend that reads special-token strings as plain text and, for
    ``strip_prefix_space``, never prepends the dummy-prefix space (False for a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())

    def strip_prefix(node: object) -> object:
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                node = {**node, "prepend_scheme": "never", "add_prefix_space": False}
            elif node.get("type") == "ByteLevel":
                node = {**node, "add_prefix_space": False}
            for key in ("pretokenizers", "normalizers"):
                if key in node:
                    node = {**node, key: [strip_prefix(n) for n in node[key] if _keeps(n)]}
            return node
        return node

    if strip_prefix_space:
        spec["pre_tokenizer"] = strip_prefix(spec.get("pre_tokenizer"))
        normalizer = spec.get("normalizer")
        spec["normalizer"] = (
            None if normalizer is not None and not _keeps(normalizer) else strip_prefix(normalizer)
        )
    clone = Tokenizer.from_str(json.dumps(spec))
    if hasattr(clone, "encode_special_tokens"):
        clone.encode_special_tokens = True  # "<|im_end|>" typed in a response is text, not the control token
    return clone


def _keeps(node: object) -> bool:
    """False for a normaliser that prepends the SentencePiece space (legacy Llama tokenizers)."""
    return not (isinstance(node, dict) and node.get("type") == "Prepend")


def _as_int_list(ids: TokenIds | Iterable[int]) -> list[int]:
    if isinstance(ids, list):
        return ids
    tolist = getattr(ids, "tolist", None)
    if tolist is not None:
        return tolist()
    return list(ids)


def _component_json(component: object) -> str:
    if component is None:
        return ""
    try:
        state = component.__getstate__()
    except Exception:  # noqa: BLE001 - components without a JSON state just give no evidence
        return repr(component)
    return state.decode("utf-8", errors="replace") if isinstance(state, bytes) else str(state)


def tokenizer_kind(tokenizer: Tokenizer) -> str:
    """``"byte_level"`` or ``"sentencepiece"``; raises :class:`UnsupportedTokenizerError` for anything else."""
    name = tokenizer_name(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        if getattr(tokenizer, "sp_model", None) is not None:
            return "sentencepiece"
        if hasattr(tokenizer, "byte_encoder") or hasattr(tokenizer, "byte_decoder"):
            return "byte_level"
        raise UnsupportedTokenizerError(
            f"Tokenizer {name!r} ({type(tokenizer).__name__}) is neither a fast tokenizer nor a SentencePiece or "
            "byte-level one: its tokens cannot be mapped to bytes. Load it with use_fast=True."
        )
    model_type = type(backend.model).__name__
    pre = _component_json(backend.pre_tokenizer)
    dec = _component_json(backend.decoder)
    norm = _component_json(backend.normalizer)
    if model_type == "WordPiece" or "WordPiece" in dec or "BertPreTokenizer" in pre:
        raise UnsupportedTokenizerError(
            f"Tokenizer {name!r} is WordPiece: it drops spaces, so its tokens cannot be mapped back to the bytes "
            "of the text. GOLD alignment supports byte-level BPE (GPT-2, Qwen, Llama-3) and SentencePiece "
            "(Llama-2, Mistral, Gemma) tokenizers."
        )
    if "ByteLevel" in pre or "ByteLevel" in dec:
        return "byte_level"
    if "Metaspace" in pre or "Metaspace" in dec or SPIECE_SPACE in dec or SPIECE_SPACE in norm:
        return "sentencepiece"
    raise UnsupportedTokenizerError(
        f"Tokenizer {name!r} ({model_type} model, pre-tokenizer {pre[:80]!r}) is neither byte-level BPE nor "
        "SentencePiece: its tokens cannot be mapped to bytes, so it cannot be aligned."
    )


def _special_ids(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    special = np.zeros(vocab_size, dtype=bool)
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in added.items() if getattr(tok, "special", False))
    for i in ids:
        if i is not None and 0 <= i < vocab_size:
            special[i] = True
    return special


def _build_table(tokenizer: Tokenizer) -> TokenTable:
    kind = tokenizer_kind(tokenizer)
    name = tokenizer_name(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    vocab_size = max(len(tokenizer), max(added, default=-1) + 1)
    # A list for a list of ids; a slow tokenizer may give None for an id it does not know.
    pieces = cast("Sequence[str | None]", tokenizer.convert_ids_to_tokens(list(range(vocab_size))))
    special = _special_ids(tokenizer, vocab_size)
    added_plain = {i for i, tok in added.items() if not getattr(tok, "special", False)}
    byte_fallback = np.zeros(vocab_size, dtype=bool)
    out: list[bytes] = [b""] * vocab_size
    if kind == "byte_level":
        table = _byte_level_decoder_table()
        for i, piece in enumerate(pieces):
            if piece is None or special[i]:
                continue
            if i in added_plain:  # added tokens match literal text, not the byte-level alphabet
                out[i] = piece.encode("utf-8")
                continue
            try:
                out[i] = piece.translate(table).encode("latin-1")
            except UnicodeEncodeError:
                out[i] = piece.encode("utf-8")
    else:
        has_fallback = _has_byte_fallback(tokenizer)
        for i, piece in enumerate(pieces):
            if piece is None or special[i]:
                continue
            match = _BYTE_PIECE.match(piece) if has_fallback and piece.startswith("<0x") else None
            if match is not None:
                out[i] = bytes([int(match.group(1), 16)])
                byte_fallback[i] = True
            else:
                out[i] = piece.replace(SPIECE_SPACE, " ").encode("utf-8")
    lengths = np.fromiter(map(len, out), dtype=np.int64, count=vocab_size)
    lengths.setflags(write=False)
    table_obj = TokenTable(
        name=name,
        kind=kind,
        token_bytes=out,
        byte_lengths=lengths,
        special=special,
        byte_fallback=byte_fallback,
        adds_prefix_space=False,
        fingerprint=hash((kind, tuple(out))),
    )
    probe = _encode_plain(tokenizer, "a")
    table_obj.adds_prefix_space = b"".join(out[i] for i in probe if 0 <= i < vocab_size) == b" a"
    return table_obj


def _has_byte_fallback(tokenizer: Tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return bool(getattr(backend.model, "byte_fallback", False))
    sp_model = getattr(tokenizer, "sp_model", None)
    return sp_model is not None
