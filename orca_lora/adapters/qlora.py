"""QLoRA (Dettmers et al. 2023): LoRA on a frozen base weight stored in 4-bit NormalFloat, and the
`qlora` method spec.

Storage of W (d_out x d_in), flattened row-major and zero-padded to whole blocks of 64:

    c_j  = absmax(W_block_j)                        one fp32 constant per block of 64 values,
    code = argmin_i |W / c_j - q_i|                 q = NF4_LEVELS, two 4-bit codes per uint8,
    c_j  ~ mu + s_k * round(127 (c_j - mu) / absmax_k(c - mu))     double quantization,

where mu is the mean of all constants and s_k = absmax_k(c - mu) / 127 is one fp32 scale per block
of 256 constants. The second quantization is symmetric int8 absmax (block-wise
X_int8 = round(127 / absmax(X) X)) rather than the paper's 8-bit float; with 8-bit codes and
blocks of 256 it costs the same 8/64 + 32/(64 * 256) ~ 0.127 bits per parameter, so storage is
~4.127 bits/param against 4.5 without double quantization (the paper's 0.37-bit saving).
Dequantization is W ~ q[code] * c_j. The layer computes h = dequant(W) x + b + s B A x. Its
adapter is a plain LoRA A, B, so it is saved in PEFT's layout as LoRA, and its weight change is the
learned s B A only: the 4-bit W0 also differs from the source W0 by the quantization error, which no
training produced.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.adapters.lora import LoRA, LoRALinear
from orca_lora.adapters.spec import register_method

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")); built by create_normal_map: the
# N(0, 1) quantiles at 8 points in [0.5, 0.9677083) for the positive half, 7 for the negative half,
# an exact 0, normalised to [-1, 1].
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
NF4_BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256
_INT8_MAX = 127


@dataclass
class NF4Weight:
    """A tensor in NF4 with double-quantized block constants (see the module docstring)."""

    codes: Tensor  # uint8 (padded numel / 2,): two codes per byte, the earlier one in the high nibble
    quantized_absmax: Tensor  # int8 (blocks,): the block constants, centred and int8-quantized
    absmax_scales: Tensor  # float32 (ceil(blocks / absmax_block_size),)
    absmax_mean: Tensor  # float32 scalar: mu, subtracted before the second quantization
    shape: tuple[int, ...]
    numel: int
    block_size: int = NF4_BLOCK_SIZE
    absmax_block_size: int = ABSMAX_BLOCK_SIZE

    @property
    def stored_bits(self) -> int:
        """Bits held by the four stored tensors."""
        tensors = (self.codes, self.quantized_absmax, self.absmax_scales, self.absmax_mean)
        return sum(8 * t.numel() * t.element_size() for t in tensors)

    @property
    def bits_per_param(self) -> float:
        return self.stored_bits / self.numel


def pack_codes(codes: Tensor) -> Tensor:
    """uint8 codes in [0, 15] of even length n -> n / 2 bytes, code 2i in the high nibble of byte i."""
    if codes.dtype != torch.uint8 or codes.ndim != 1 or codes.numel() % 2:
        raise ValueError(f"codes must be a 1-d uint8 tensor of even length, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes must be in [0, 15], got a maximum of {int(codes.max())}")
    return (codes[0::2] << 4) | codes[1::2]


def unpack_codes(packed: Tensor) -> Tensor:
    """Inverse of pack_codes: n bytes -> 2n codes."""
    return torch.stack((packed >> 4, packed & 15), dim=1).flatten()


def _blocks(values: Tensor, block_size: int) -> Tensor:
    """Flatten and zero-pad `values` to whole blocks; shape (blocks, block_size)."""
    flat = values.reshape(-1)
    return F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)


def _nonzero_divisor(scale: Tensor) -> Tensor:
    """An all-zero block has scale 0 and codes for 0; divide by 1 there instead."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_nf4_blocks(values: Tensor, block_size: int = NF4_BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """(unpacked uint8 codes of the padded values, fp32 absmax per block): the index of the NF4
    level nearest to each value divided by its block's absmax (QLoRA sec. 3, block-wise absmax)."""
    blocks = _blocks(values.detach().float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    levels = NF4_LEVELS.to(blocks.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(blocks / _nonzero_divisor(absmax)[:, None], midpoints)
    return codes.to(torch.uint8).reshape(-1), absmax


def quantize_absmax(absmax: Tensor, block_size: int = ABSMAX_BLOCK_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization: (int8 codes, fp32 scale per block of `block_size`, fp32 mean) of the
    constants c, as round(127 (c - mean) / absmax_block(c - mean))."""
    mean = absmax.float().mean()
    blocks = _blocks(absmax.float() - mean, block_size)
    scales = blocks.abs().amax(dim=1) / _INT8_MAX
    quantized = torch.round(blocks / _nonzero_divisor(scales)[:, None]).clamp(-_INT8_MAX, _INT8_MAX)
    return quantized.to(torch.int8).reshape(-1)[: absmax.numel()], scales, mean


def dequantize_absmax(quantized: Tensor, scales: Tensor, mean: Tensor, block_size: int = ABSMAX_BLOCK_SIZE) -> Tensor:
    """mean + scale_k * code: the block constants back in fp32."""
    blocks = _blocks(quantized.float(), block_size)
    return (mean + blocks * scales[:, None]).reshape(-1)[: quantized.numel()]


def quantize_nf4(weight: Tensor, block_size: int = NF4_BLOCK_SIZE,
                 absmax_block_size: int = ABSMAX_BLOCK_SIZE) -> NF4Weight:
    """NF4 codes (packed) and double-quantized block constants of `weight`, any shape and size."""
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2 (QLoRA uses 64), got {block_size}")
    if absmax_block_size < 1:
        raise ValueError(f"absmax_block_size must be >= 1 (QLoRA uses 256), got {absmax_block_size}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)}); nothing to quantize")
    if not torch.isfinite(weight).all():
        raise ValueError("weight holds inf or nan values; NF4 needs finite block maxima")
    codes, absmax = quantize_nf4_blocks(weight, block_size)
    quantized_absmax, scales, mean = quantize_absmax(absmax, absmax_block_size)
    return NF4Weight(pack_codes(codes), quantized_absmax, scales, mean, tuple(weight.shape), weight.numel(),
                     block_size, absmax_block_size)


def dequantize_nf4(quantized: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """W ~ NF4_LEVELS[code] * c_block, in `dtype` and the stored shape."""
    absmax = dequantize_absmax(quantized.quantized_absmax, quantized.absmax_scales, quantized.absmax_mean,
                               quantized.absmax_block_size)
    levels = NF4_LEVELS.to(quantized.codes.device)[unpack_codes(quantized.codes).long()]
    blocks = levels.view(-1, quantized.block_size) * absmax[:, None]
    return blocks.reshape(-1)[: quantized.numel].view(quantized.shape).to(dtype)


class NF4Linear(nn.Module):
    """Frozen h = dequant(W) x + b, W kept only as NF4 buffers; the bias keeps its dtype."""

    def __init__(self, linear: nn.Linear, block_size: int = NF4_BLOCK_SIZE,
                 absmax_block_size: int = ABSMAX_BLOCK_SIZE) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        quantized = quantize_nf4(linear.weight, block_size, absmax_block_size)
        self.block_size, self.absmax_block_size = block_size, absmax_block_size
        self.register_buffer("weight_codes", quantized.codes)
        self.register_buffer("weight_quantized_absmax", quantized.quantized_absmax)
        self.register_buffer("weight_absmax_scales", quantized.absmax_scales)
        self.register_buffer("weight_absmax_mean", quantized.absmax_mean)
        self.bias = None if linear.bias is None else linear.bias.requires_grad_(False)

    @property
    def quantized_weight(self) -> NF4Weight:
        return NF4Weight(self.weight_codes, self.weight_quantized_absmax, self.weight_absmax_scales,
                         self.weight_absmax_mean, (self.out_features, self.in_features),
                         self.out_features * self.in_features, self.block_size, self.absmax_block_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_nf4(self.quantized_weight, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, absmax_block_size={self.absmax_block_size}, "
                f"bits_per_param={self.quantized_weight.bits_per_param:.3f}")


class QLoRALinear(LoRALinear):
    """h = dequant(W0) x + b + s B A x with W0 in NF4 (NF4Linear); the fp W0 is dropped.

    merge() cannot fold s B A into 4-bit codes without re-quantizing (which would change W0), so it
    stores the plain weight dequant(W0) + s B A beside the NF4 buffers and forward uses that; the
    NF4 buffers stay untouched, so unmerge() drops the plain weight and is exact. A merged layer
    holds an fp weight again: merge to export or serve, not to save memory.
    """

    method = "qlora"

    def init_adapter(self, generator: torch.Generator | None) -> None:
        super().init_adapter(generator)
        self.base_layer = NF4Linear(self.base_layer)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.merged_weight.to(x.dtype), self.base_layer.bias)
        return super().forward(x)

    def merge(self) -> None:
        """Forward switches to the plain weight dequant(W0) + s B A; the NF4 buffers are kept."""
        self._check_merged(False)
        with torch.no_grad():
            weight = self.base_layer.dequantized_weight(self.lora_A.dtype) + self.delta_weight()
        self.register_buffer("merged_weight", weight)
        self.merged = True

    def unmerge(self) -> None:
        """Drop the plain weight; forward dequantizes the untouched NF4 buffers again (exact)."""
        self._check_merged(True)
        del self.merged_weight
        self.merged = False


@register_method
class QLoRA(LoRA):
    name, layer = "qlora", QLoRALinear


def nf4_bits_per_param(module: nn.Module) -> float:
    """Stored bits per weight parameter over every NF4Linear in `module` (NaN when there is none)."""
    weights = [m.quantized_weight for m in module.modules() if isinstance(m, NF4Linear)]
    params = sum(w.numel for w in weights)
    return sum(w.stored_bits for w in weights) / params if params else math.nan
