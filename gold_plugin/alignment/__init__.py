"""Cross-tokenizer alignment (docs/design.md, "Alignment"; docs/alignment.md): canonical token bytes, span groups and the vocabulary map.

Pure numpy (torch only on request); imports neither Ray, vLLM, DeepSpeed nor OpenRLHF.

Typical use for one sample::

    text = text_for_teacher(student_tok, response_ids)                  # from canonical bytes, not decode
    teacher_ids = encode_continuation(teacher_tok, text) + [teacher_tok.eos_token_id]
    alignment = align(student_tok, response_ids, teacher_tok, teacher_ids)
    student_first, teacher_first = group_starts(alignment)
"""

from gold_plugin.alignment.flat import FlatAlignment
from gold_plugin.alignment.result import Alignment
from gold_plugin.alignment.spans import align, align_batch, group_starts
from gold_plugin.alignment.token_bytes import (
    TokenTable,
    UnsupportedTokenizerError,
    adds_prefix_space,
    clear_token_bytes_cache,
    encode_continuation,
    encode_continuation_batch,
    ids_to_bytes,
    incomplete_utf8_tail_length,
    text_for_teacher,
    token_byte_lengths,
    token_bytes,
    token_table,
    tokenizer_kind,
)
from gold_plugin.alignment.types import ChatTokenizer, TokenIds, Tokenizer
from gold_plugin.alignment.vocab_map import VocabMap

__all__ = [
    "Alignment",
    "ChatTokenizer",
    "FlatAlignment",
    "TokenIds",
    "TokenTable",
    "Tokenizer",
    "UnsupportedTokenizerError",
    "VocabMap",
    "adds_prefix_space",
    "align",
    "align_batch",
    "clear_token_bytes_cache",
    "encode_continuation",
    "encode_continuation_batch",
    "group_starts",
    "ids_to_bytes",
    "incomplete_utf8_tail_length",
    "text_for_teacher",
    "token_byte_lengths",
    "token_bytes",
    "token_table",
    "tokenizer_kind",
]
