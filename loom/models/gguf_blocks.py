"""GGUF's block formats decoded with torch: Q4_1 and Q8_0 kept as their blocks, or floats.

Owns the byte layout of ggml blocks, `Q4Groups` and `Q8Blocks`: the forms in which 4-bit and
8-bit weights travel from the file to the kernels that read them as they are (an int4 linear, the
Q8_0 output head) without being dequantized first. Values equal `gguf.quants.dequantize`'s
bit for bit (same float32 operations in the same order), only ~10x faster. Never reads files or
names tensors (loader_gguf.py does).

ggml blocks of 32 values along a row (GGUF dims list the row length first):

    Q4_1: f16 d | f16 m | 16 bytes: value j in the low nibble of byte j, value j + 16 in its high nibble
          value = d * code + m
    Q8_0: f16 d | 32 int8 codes            value = code * d
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

GROUP_SIZE = 32  # values per ggml block, and the int4 kernel's group size
_Q4_1_BYTES = 20
_Q8_0_BYTES = 34


@dataclass(frozen=True, slots=True)
class Q4Groups:
    """A `[rows, cols]` weight as 4-bit codes with one affine map per 32 values of a row."""

    codes: torch.Tensor  # [rows, cols] uint8 in 0..15
    scales: torch.Tensor  # [rows, cols // 32] float32 (Q4_1's d)
    offsets: torch.Tensor  # [rows, cols // 32] float32 (Q4_1's m): value = code * scale + offset

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    def dequantize(self) -> torch.Tensor:  # [rows, cols] float32
        rows, cols = self.shape
        grouped = self.codes.view(rows, -1, GROUP_SIZE).float()
        return (self.scales.unsqueeze(-1) * grouped + self.offsets.unsqueeze(-1)).view(rows, cols)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Q4Groups:
        """The same groups with `fn` (a row reordering such as RoPE un-permutation) applied to every field."""
        return Q4Groups(fn(self.codes), fn(self.scales), fn(self.offsets))

    @staticmethod
    def cat_rows(parts: list[Q4Groups]) -> Q4Groups:
        return Q4Groups(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat([p.offsets for p in parts]),
        )


def q4_1_groups(raw: np.ndarray, rows: int, cols: int) -> Q4Groups:
    """Decodes a Q4_1 tensor's bytes (`[rows, cols / 32 * 20]` uint8) without dequantizing."""
    blocks = _blocks(raw, rows * cols // GROUP_SIZE, _Q4_1_BYTES)
    scales = blocks[:, 0:2].contiguous().view(torch.float16).float().view(rows, -1)
    offsets = blocks[:, 2:4].contiguous().view(torch.float16).float().view(rows, -1)
    packed = blocks[:, 4:]  # [n_blocks, 16]
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=1)  # values 0..15 then 16..31 of each block
    return Q4Groups(codes.view(rows, cols), scales, offsets)


@dataclass(frozen=True, slots=True)
class Q8Blocks:
    """A `[rows, cols]` weight as int8 codes with one scale per 32 values of a row (value = code * scale)."""

    codes: torch.Tensor  # [rows, cols] int8
    scales: torch.Tensor  # [rows, cols // 32] float16 (Q8_0's d, as stored)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    def dequantize(self) -> torch.Tensor:  # [rows, cols] float32
        rows, cols = self.shape
        grouped = self.codes.view(rows, -1, GROUP_SIZE).float()
        return (grouped * self.scales.float().unsqueeze(-1)).view(rows, cols)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Q8Blocks:
        return Q8Blocks(fn(self.codes), fn(self.scales))


Blocks = Q4Groups | Q8Blocks


def as_float(source: torch.Tensor | Blocks) -> torch.Tensor:
    """A weight's values as floats: blocks dequantized, a tensor as it is."""
    return source if isinstance(source, torch.Tensor) else source.dequantize()


def q8_0_blocks(raw: np.ndarray, rows: int, cols: int) -> Q8Blocks:
    """Decodes a Q8_0 tensor's bytes (`[rows, cols / 32 * 34]` uint8) without dequantizing."""
    blocks = _blocks(raw, rows * cols // GROUP_SIZE, _Q8_0_BYTES)
    scales = blocks[:, 0:2].contiguous().view(torch.float16).view(rows, -1)
    codes = blocks[:, 2:].contiguous().view(torch.int8).view(rows, cols)
    return Q8Blocks(codes, scales)


def q8_0_values(raw: np.ndarray, rows: int, cols: int) -> torch.Tensor:  # [rows, cols] float32
    return q8_0_blocks(raw, rows, cols).dequantize()


def float_values(raw: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """F32 / F16 / BF16 tensors: the file's values as float32 (owned memory, not the memory map)."""
    data = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8).copy())
    return data.view(dtype).float().view(shape)


def _blocks(raw: np.ndarray, num_blocks: int, block_bytes: int) -> torch.Tensor:
    # One copy out of the read-only memory map: torch cannot wrap a non-writable buffer safely.
    data = np.ascontiguousarray(raw).reshape(-1)
    if data.size != num_blocks * block_bytes:
        raise ValueError(f"tensor holds {data.size} bytes, its shape implies {num_blocks * block_bytes}")
    return torch.from_numpy(data.copy()).view(num_blocks, block_bytes)
