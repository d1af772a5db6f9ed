"""GGUF's quantized blocks as the codes Ember's packed kernel multiplies, without a float copy.

Ember's 4-, 5- and 8-bit weights (`native.Q4Weight`) hold, per 32 inputs of an output row, codes q and
two float16 numbers d and m: w = d·q + m (m not stored where it is -2^(bits-1)·d: Q4_0, Q5_0, Q8_0).
5-bit codes are held as 4-bit nibbles plus a plane of fifth bits (5 bits a weight, as in the file).
Every block type llama.cpp writes for the models Ember serves is that form, or nearly, so a GGUF
tensor is repacked block for block (`Codes` keeps d and m in float32; the packing rounds them to
float16, which the 32-input types already are, while the K types' products d·scale_j lose at most
2^-11 of themselves):

| GGUF type | bits/weight | Ember's codes                     | d, m per 32 inputs                   | exact |
|-----------|-------------|-----------------------------------|--------------------------------------|-------|
| Q4_0      | 4.5         | 4-bit, the block's nibbles        | d, -8·d                              | yes   |
| Q4_1      | 5           | 4-bit                             | d, m                                 | yes   |
| Q4_K      | 4.5         | 4-bit                             | d·scale_j, -dmin·min_j (8 per block) | yes   |
| Q5_0      | 5.5         | 5-bit, 0..31                      | d, -16·d                             | yes   |
| Q5_1      | 6           | 5-bit                             | d, m                                 | yes   |
| Q5_K      | 5.5         | 5-bit                             | d·scale_j, -dmin·min_j               | yes   |
| Q8_0      | 8.5         | 8-bit, q + 128                    | d, -128·d                            | yes   |
| Q6_K      | 6.56        | 8-bit: 0..63 where the two 16-wide | d·s, -32·d·s; else requantized over  | see   |
|           |             | halves share a scale              | the 32 values' range (255 steps)     | left  |

Q6_K scales each 16 inputs; Ember's groups are 32 wide. Where the two halves of a group carry the same
scale the codes are exact; elsewhere the 32 values are requantized to 8 bits over their range, so each
weight moves by at most half of (range / 255): about an eighth of Q6_K's own coarser step.
`benchmarks/results/quality.md` states what that costs end to end.

Types not listed (Q2_K, Q3_K, the IQ family, ...) are refused by name before any load (`unsupported`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32
"""Inputs per (d, m) pair in Ember's packed weights (native.Q4_GROUP)."""

# name: (block elements, block bytes, Ember's code bits)
LAYOUTS: dict[str, tuple[int, int, int]] = {
    "Q4_0": (32, 18, 4),
    "Q4_1": (32, 20, 4),
    "Q5_0": (32, 22, 5),
    "Q5_1": (32, 24, 5),
    "Q8_0": (32, 34, 8),
    "Q4_K": (256, 144, 4),
    "Q5_K": (256, 176, 5),
    "Q6_K": (256, 210, 8),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
"""Stored as floats: they stay in their own dtype."""


class UnsupportedQuant(ValueError):
    """A tensor's block type Ember cannot run; raised before anything is loaded."""


def unsupported(type_name: str) -> str | None:
    """Why a tensor of GGML type `type_name` cannot be served (None: it can)."""
    if type_name in LAYOUTS or type_name in FLOAT_TYPES:
        return None
    known = ", ".join([*LAYOUTS, *FLOAT_TYPES])
    return f"GGUF tensor type {type_name} is not one Ember runs (it runs {known})"


@dataclass
class Codes:
    """A [rows, cols] weight as w = scale·codes + low per 32 inputs: what `native.Q4Weight.pack` takes."""

    codes: torch.Tensor  # uint8 [rows, cols], values below 2**bits
    scale: torch.Tensor  # float32 [rows, cols / 32]
    low: torch.Tensor  # float32 [rows, cols / 32]
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def padded(self, rows: int) -> Codes:
        """With zero rows (zero weights) appended up to `rows`."""
        extra = rows - self.codes.shape[0]
        pad = lambda t: torch.cat([t, t.new_zeros(extra, t.shape[1])])  # noqa: E731
        return Codes(pad(self.codes), pad(self.scale), pad(self.low), self.bits)

    def widened(self, bits: int) -> Codes:
        """The same weights with `bits`-bit codes (narrower codes are wider ones below their range: exact)."""
        return self if self.bits == bits else Codes(self.codes, self.scale, self.low, bits)

    @staticmethod
    def cat(parts: list[Codes]) -> Codes:
        """Rows of several weights one after the other (q|k|v), at the widest code width among them."""
        if len({p.bits for p in parts}) > 1:
            parts = [p.widened(max(p.bits for p in parts)) for p in parts]
        return Codes(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.low for p in parts]),
            parts[0].bits,
        )

    def packed(self):
        """These codes in the packed kernel's layout (`native.Q4Weight`, d and m rounded to float16)."""
        from ember.shard import native

        return native.Q4Weight.pack(self.codes, self.scale, self.low, bits=self.bits)

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        q = self.codes.float().view(rows, cols // GROUP, GROUP)
        return (q * self.scale[..., None] + self.low[..., None]).view(rows, cols)

    @property
    def nbytes_packed(self) -> int:
        """Bytes once packed: the codes at their width, d and m as float16 (m not where it is -2^(bits-1)·d)."""
        from ember.shard import native

        symmetric = torch.equal(self.low.half(), native.symmetric_lows(self.scale.half(), self.bits))
        return self.codes.numel() * self.bits // 8 + 2 * (1 if symmetric else 2) * self.scale.numel()


def _f16(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian float16 at byte `at` of each block, as float32 [blocks]."""
    return raw[:, at : at + 2].contiguous().view(torch.float16).float().view(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[blocks, n] bytes → [blocks, 2n]: the low nibbles, then the high ones (llama.cpp's 32-block order)."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[blocks, n] bytes → [blocks, 8n] of 0/1: bit j of the little-endian bit string."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], -1)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes of Q4_K/Q5_K scales → eight 6-bit scales and eight 6-bit mins per block (float32).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7 take their
    low 4 bits from bytes 8-11 (scale: low nibble, min: high nibble) and their top 2 bits from the
    top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    first, second, third = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([first & 63, (third & 15) | ((first >> 6) << 4)], dim=-1)
    mins = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def _decode_blocks(type_name: str, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw uint8 [blocks, block bytes] → codes uint8 [blocks, elements], scale and low [blocks, elements / 32]."""
    n = raw.shape[0]
    if type_name in ("Q4_0", "Q4_1"):
        d = _f16(raw, 0)
        low = _f16(raw, 2) if type_name == "Q4_1" else -8.0 * d
        return _nibbles(raw[:, -16:]), d[:, None], low[:, None]
    if type_name in ("Q5_0", "Q5_1"):
        d = _f16(raw, 0)
        low = _f16(raw, 2) if type_name == "Q5_1" else -16.0 * d
        high = _bits(raw[:, -20:-16])
        return _nibbles(raw[:, -16:]) | (high << 4), d[:, None], low[:, None]
    if type_name == "Q8_0":
        d = _f16(raw, 0)
        codes = (raw[:, 2:34].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return codes, d[:, None], (-128.0 * d)[:, None]
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(raw, 0), _f16(raw, 2)
        scales, mins = _k_scales(raw[:, 4:16])
        qs = raw[:, -128:].reshape(n, 4, 32)  # 4 runs of 32 bytes: sub-blocks 2r (low nibbles), 2r+1 (high)
        codes = torch.stack([qs & 15, qs >> 4], dim=2).reshape(n, 8, 32)
        if type_name == "Q5_K":
            qh = raw[:, 16:48]  # bit j of byte l: the fifth bit of input l of sub-block j
            shifts = torch.arange(8, dtype=torch.uint8)[:, None]
            codes = codes | (((qh[:, None, :] >> shifts) & 1) << 4)
        return codes.reshape(n, 256), d[:, None] * scales, -dmin[:, None] * mins
    if type_name == "Q6_K":
        return _decode_q6_k(raw)
    raise UnsupportedQuant(unsupported(type_name) or type_name)


def _decode_q6_k(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K: per 256 inputs, 4 low bits (128 bytes), 2 high bits (64 bytes), 16 int8 scales, d.

    Each half of 128 inputs takes 64 low-bit bytes and 32 high-bit bytes: input 32·i + l (i < 4,
    l < 32) has the low nibble (i < 2) or high nibble (i ≥ 2) of low byte l + 32·(i % 2) and bits
    2i..2i+1 of high byte l; its value is d·scale[(32·i + l) / 16]·(q - 32)."""
    n = raw.shape[0]
    q, step = _q6_k_fields(raw)
    same = step[..., 0] == step[..., 1]
    scale, low = step[..., 0].clone(), -32.0 * step[..., 0]
    codes = q.clone()
    if not bool(same.all()):
        values = (q.float() - 32.0).view(n, 8, 2, 16) * step[..., None]
        values = values.view(n, 8, 32)
        lo, hi = values.amin(dim=-1), values.amax(dim=-1)
        rescale = ((hi - lo) / 255.0).clamp(min=1e-30)
        requant = torch.round((values - lo[..., None]) / rescale[..., None]).clamp(0, 255).to(torch.uint8)
        codes = torch.where(same[..., None], codes, requant)
        scale = torch.where(same, scale, rescale)
        low = torch.where(same, low, lo)
    return codes.reshape(n, 256), scale, low


def _q6_k_fields(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K's codes [blocks, 8 groups, 32] (0..63, in input order) and steps [blocks, 8 groups, 2 halves]."""
    n = raw.shape[0]
    ql = raw[:, 0:128].reshape(n, 2, 2, 32)  # [half, which 32 bytes, l]
    qh = raw[:, 128:192].reshape(n, 2, 1, 32)
    sc = raw[:, 192:208].view(torch.int8).float().reshape(n, 16)
    d = _f16(raw, 208)
    low4 = torch.cat([ql & 15, ql >> 4], dim=2)  # [n, half, i, l]: i = 0, 1 low nibbles, 2, 3 high
    high2 = (qh >> (2 * torch.arange(4, dtype=torch.uint8)).view(1, 1, 4, 1)) & 3
    q = (low4 | (high2 << 4)).reshape(n, 8, 32)  # eight groups of 32 inputs, in order
    return q, (d[:, None] * sc).view(n, 8, 2)  # each group's two 16-wide halves


def decode(type_name: str, raw: torch.Tensor, shape: tuple[int, int]) -> Codes:
    """A quantized GGUF tensor's bytes (uint8, [rows, row bytes] or flat) as Ember's codes, [rows, cols]."""
    if type_name not in LAYOUTS:
        raise UnsupportedQuant(unsupported(type_name) or f"{type_name} is stored as floats, not blocks")
    elements, block_bytes, bits = LAYOUTS[type_name]
    rows, cols = shape
    if cols % elements:
        raise ValueError(f"a {type_name} row of {cols} inputs is not a whole number of {elements}-input blocks")
    blocks = raw.reshape(-1, block_bytes)
    if blocks.shape[0] * elements != rows * cols:
        raise ValueError(f"{blocks.shape[0]} {type_name} blocks do not hold a {rows}x{cols} tensor")
    codes, scale, low = _decode_blocks(type_name, blocks)
    return Codes(
        codes.reshape(rows, cols),
        scale.reshape(rows, cols // GROUP).contiguous(),
        low.reshape(rows, cols // GROUP).contiguous(),
        bits,
    )


def dequantize(type_name: str, raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """float32 [rows, cols]: the tensor's values as GGUF defines them (Q6_K's too: no requantization), for
    the paths that multiply floats."""
    if type_name != "Q6_K":
        return decode(type_name, raw, shape).dequantize()
    blocks = raw.reshape(-1, LAYOUTS["Q6_K"][1])
    q, step = _q6_k_fields(blocks)
    return ((q.float() - 32.0).view(-1, 8, 2, 16) * step[..., None]).reshape(shape)
