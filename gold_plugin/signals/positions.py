"""The per-position batch: one base for every per-position bundle the GOLD step builds and ships (the logit losses'
inputs, the byte projection's compact positions, the hidden-state targets' transport).

A :class:`PositionBatch` is a dataclass of tensors whose first dimension is the position (N), with two fields of fixed
role: ``positions [N, 2]`` (batch row, action column) and ``sample_index [N]`` (the row). Every other field is per
position. The base gives each bundle the same :meth:`~PositionBatch.to`, :meth:`~PositionBatch.select` (a micro-batch's
samples), :meth:`~PositionBatch.pack` (per-sample tensors, as OpenRLHF's experience info carries them, with the
bundle's type tag) and :meth:`PositionBatch.unpack` (which reads the tag).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch

Batch = TypeVar("Batch", bound="PositionBatch")

PackedInputs = Mapping[str, Any]
"""Packed entries: a batched tensor or one tensor per sample each (after OpenRLHF's batching)."""

_ROLE_FIELDS = ("positions", "sample_index")
_TYPES: dict[int, type[PositionBatch]] = {}


class PositionBatch:
    """Base of the per-position dataclasses (see the module docstring). Subclasses are ``@dataclass`` with the fields
    ``positions`` and ``sample_index`` and any per-position fields."""

    positions: torch.Tensor
    sample_index: torch.Tensor
    TYPE_TAG: ClassVar[int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.TYPE_TAG = zlib.crc32(cls.__name__.encode()) & 0x7FFFFFFF
        if _TYPES.get(cls.TYPE_TAG, cls).__name__ != cls.__name__:
            raise TypeError(f"Two position batches share the type tag of {cls.__name__}.")
        _TYPES[cls.TYPE_TAG] = cls

    @property
    def num_positions(self) -> int:
        return int(self.positions.shape[0])

    def _fields(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to(self: Batch, device: torch.device | str) -> Batch:
        """Every field on ``device``."""
        return type(self)(**{name: value.to(device) for name, value in self._fields().items()})

    def select(self: Batch, rows: Sequence[int]) -> Batch:
        """The positions of samples ``rows`` (in that order), renumbered ``0..len(rows)-1``: a micro-batch's inputs
        taken from inputs built once for a whole step (columns unchanged)."""
        index = torch.as_tensor(list(rows), dtype=torch.int64, device=self.sample_index.device)
        rows_before = int(self.sample_index.max()) + 1 if self.num_positions else 0
        batch = max(rows_before, int(index.max()) + 1 if index.numel() else 0)
        new_row = torch.full((batch,), -1, dtype=torch.int64, device=index.device)
        new_row[index] = torch.arange(index.shape[0], device=index.device)
        mapped = new_row[self.sample_index.to(torch.int64)]
        keep = torch.nonzero(mapped >= 0).flatten()
        keep = keep[torch.argsort(mapped[keep], stable=True)]
        fields = {name: value[keep] for name, value in self._fields().items()}
        rows_kept = mapped[keep]
        fields["sample_index"] = rows_kept.to(self.sample_index.dtype)
        fields["positions"] = torch.stack([rows_kept, fields["positions"][:, 1].to(torch.int64)], dim=1).to(
            self.positions.dtype
        )
        return type(self)(**fields)

    def pack(self, batch_size: int, prefix: str) -> dict[str, torch.Tensor]:
        """The batch as per-sample tensors: row b holds sample b's positions, position axis last.

        Every per-position field ``[N, *rest]`` becomes ``[B, *rest, P]`` (P = the most positions of one sample,
        zero-padded, dtypes kept), plus ``columns`` ``[B, P]`` (int32 action columns), ``valid`` ``[B, P]`` (1.0 =
        a real position) and ``type`` ``[B]`` (the bundle's :attr:`TYPE_TAG`), each under ``prefix``.
        :meth:`PositionBatch.unpack` inverts it."""
        rows = self.sample_index.to(torch.int64).cpu()
        order = torch.argsort(rows, stable=True)
        rows = rows[order]
        counts = torch.bincount(rows, minlength=batch_size)
        width = int(counts.max()) if rows.numel() else 0
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.numel()) - starts[rows]
        columns = torch.zeros(batch_size, width, dtype=torch.int32)
        columns[rows, slot] = self.positions[:, 1].cpu()[order].to(torch.int32)
        valid = torch.zeros(batch_size, width)
        valid[rows, slot] = 1.0
        packed = {
            prefix + "type": torch.full((batch_size,), self.TYPE_TAG, dtype=torch.int64),
            prefix + "columns": columns,
            prefix + "valid": valid,
        }
        for name, value in self._fields().items():
            if name in _ROLE_FIELDS:
                continue
            values = value.cpu()[order]
            out = torch.zeros((batch_size, width, *values.shape[1:]), dtype=values.dtype)
            out[rows, slot] = values
            packed[prefix + name] = out.movedim(1, -1).contiguous()
        return packed

    @staticmethod
    def unpack(packed: PackedInputs, prefix: str, device: torch.device | str | None = None) -> PositionBatch:
        """What :meth:`pack` packed, as the bundle its type tag names, for a batch whose rows are the packed samples
        (a list of per-sample tensors or a batched tensor per key, widths may differ).

        A sample without positions (no ``valid`` slot) may come from a micro-batch that had none at all, whose
        per-position fields then have other inner sizes (a top-k of width 0): it holds nothing, so it takes the
        others' sizes. Samples with positions whose inner sizes differ raise ``ValueError``, as do samples of
        different bundle types."""

        def per_sample(key: str) -> list[torch.Tensor]:
            value = packed[prefix + key]
            return [
                torch.as_tensor(t) for t in (value if isinstance(value, (list, tuple)) else value.unbind(0))
            ]

        tags = {int(t.reshape(-1)[0]) for t in per_sample("type")}
        if len(tags) != 1 or next(iter(tags)) not in _TYPES:
            raise ValueError(
                f"{prefix}type: the samples carry the unknown or mixed bundle types {sorted(tags)}."
            )
        cls = _TYPES[tags.pop()]
        holds = [bool((t > 0).any()) for t in per_sample("valid")]

        def batched(key: str) -> torch.Tensor:
            items = per_sample(key)
            width = max((int(t.shape[-1]) for t in items), default=0)
            inner = {tuple(t.shape[:-1]) for t, held in zip(items, holds) if held}
            if len(inner) > 1:
                raise ValueError(f"{prefix}{key}: samples disagree on the inner sizes {sorted(inner)}.")
            # without any position in the batch: the widest inner sizes (nothing is read from them)
            rest = inner.pop() if inner else tuple(max(s) for s in zip(*(t.shape[:-1] for t in items)))
            padded = [
                torch.nn.functional.pad(t, (0, width - int(t.shape[-1])))
                if held
                else t.new_zeros((*rest, width))
                for t, held in zip(items, holds)
            ]
            return torch.stack(padded).movedim(-1, 1)  # [B, P, *rest]

        valid = batched("valid") > 0
        rows, slots = valid.nonzero(as_tuple=True)
        columns = batched("columns")[rows, slots].to(torch.int64)
        values = {
            f.name: batched(f.name)[rows, slots].to(device)
            for f in dataclasses.fields(cls)
            if f.name not in _ROLE_FIELDS
        }
        rows = rows.to(device)
        return cls(positions=torch.stack([rows, columns.to(device)], dim=1), sample_index=rows, **values)
