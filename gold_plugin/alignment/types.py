"""What the plugin reads of a tokenizer, as protocols: Hugging Face's tokenizers (``PreTrainedTokenizerBase``) satisfy
them, and nothing here imports transformers (``tests/test_tokenizer_types.py`` checks the members against
transformers' own classes).

- :class:`Tokenizer`: what the alignment, the vocabulary tables and the GOLD step read (token strings, plain
  encoding, the EOS id);
- :class:`ChatTokenizer`: what the teacher's request encoder reads besides (chat template, token lookups,
  ``decode``).

Read as well where a tokenizer has them (``getattr``, so a tokenizer may lack them): ``backend_tokenizer`` (a fast
tokenizer's Rust tokenizer), ``sp_model``, ``byte_encoder`` / ``byte_decoder``, ``all_special_ids``,
``added_tokens_decoder``, ``name_or_path``, ``bos_token_id``, ``pad_token_id``, ``chat_template``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch

TokenIds: TypeAlias = "Sequence[int] | np.ndarray | torch.Tensor"
"""One sample's token ids: a list, a 1-D numpy array or a 1-D torch tensor (unpadded)."""


class Tokenizer(Protocol):
    """The tokenizer members the alignment and the GOLD step call."""

    @property
    def eos_token_id(self) -> int | None: ...

    def __len__(self) -> int:
        """Size of the vocabulary, added tokens included."""
        ...

    def convert_ids_to_tokens(self, ids: list[int]) -> str | list[str]:
        """The token string of every id of ``ids`` (a list for a list)."""
        ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id (the vocabulary map's exact-string shares, TRL's rule)."""
        ...

    def __call__(
        self, text: str | list[str], *, add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> Mapping[str, Any]:
        """The encoding of ``text`` (of each text of a list): ``["input_ids"]`` holds the ids (Hugging Face's
        ``BatchEncoding``)."""
        ...


class ChatTokenizer(Tokenizer, Protocol):
    """:class:`Tokenizer` plus what the teacher's request encoder calls (the teacher's own chat template)."""

    @property
    def all_special_ids(self) -> list[int]: ...

    @property
    def unk_token(self) -> str | None: ...

    @property
    def unk_token_id(self) -> int | None: ...

    def convert_tokens_to_ids(self, tokens: str) -> int | list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str | list[str]: ...

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        *,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
    ) -> str | list[int] | list[str] | list[list[int]] | Mapping[str, Any]:
        """The conversation rendered with the tokenizer's template: text with ``tokenize=False``."""
        ...


__all__ = ["ChatTokenizer", "TokenIds", "Tokenizer"]
