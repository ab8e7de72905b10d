"""The target embedder f_t (README, "Stage 1: align"): a patch embedding shaped like the body's own.

ORCA (Shen et al. 2023) maps target inputs onto the source token grid with resize ->
Conv2d(kernel = stride = patch) -> LayerNorm, so the frozen body sees tokens of the shape its
patch embedding makes; `init="source"` starts from the body's patch embedding, as ORCA's code does, adapted to
the task's channel count as timm adapts a pretrained stem.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from timm.models import adapt_input_conv
from torch import Tensor, nn

from orca_lora.models.body import body_img_size, body_token_grid
from orca_lora.registry import registrar


class Embedder(nn.Module):
    """(B, C_in, H, W) inputs -> (B, h, w, embed_dim) NHWC tokens, like timm's Swin PatchEmbed."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, img_size: tuple[int, int],
                 norm_eps: float = 1e-5, generator: torch.Generator | None = None):
        super().__init__()
        if min(img_size) < patch_size or any(side % patch_size for side in img_size):
            raise ValueError(f"img_size {tuple(img_size)} must be a positive multiple of patch_size {patch_size}")
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.patch_size = int(patch_size)
        self.in_channels = int(in_channels)  # kept here: `proj` may be wrapped by a LoRA layer
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's Conv2d default init (kaiming-uniform, a=sqrt(5)), drawn from `generator`."""
        nn.init.kaiming_uniform_(self.proj.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(self.proj.weight[0].numel())
        nn.init.uniform_(self.proj.bias, -bound, bound, generator=generator)
        self.norm.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"embedder expects (B, {self.in_channels}, H, W) inputs, got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}"

    @classmethod
    def from_body(cls, body: nn.Module, in_channels: int, init: str = "random",
                  generator: torch.Generator | None = None) -> "Embedder":
        """An embedder onto `body`'s token grid, initialised by `init` (a key of EMBEDDER_INITS)."""
        if init not in EMBEDDER_INITS:
            raise ValueError(f"embedder init {init!r} is not one of {sorted(EMBEDDER_INITS)}")
        _, _, embed_dim = body_token_grid(body)
        embedder = cls(in_channels, embed_dim, int(body.patch_embed.patch_size[0]), body_img_size(body),
                       norm_eps=body.patch_embed.norm.eps)
        EMBEDDER_INITS[init](embedder, body, generator)
        return embedder


EmbedderInit = Callable[[Embedder, nn.Module, "torch.Generator | None"], None]
EMBEDDER_INITS: dict[str, EmbedderInit] = {}


register_init = registrar(EMBEDDER_INITS)


@register_init("random")
def _random_init(embedder: Embedder, body: nn.Module, generator: torch.Generator | None) -> None:
    """ORCA's f_t (Shen et al. 2023) as the project's sources use it: a fresh PyTorch-default init drawn from `generator`."""
    embedder.reset_parameters(generator)


@register_init("source")
def _source_init(embedder: Embedder, body: nn.Module, generator: torch.Generator | None) -> None:
    """A copy of the body's patch-embedding conv and norm. For another input channel count the conv's weight is
    adapted as timm adapts a pretrained stem (`timm.models.adapt_input_conv`): summed over the source's channels
    for one channel (a grey image then embeds as its RGB copy does), repeated and scaled by C_source / C_in for
    more (C_in / C_source stacked copies of an image embed as the image does)."""
    source = body.patch_embed.proj
    with torch.no_grad():
        embedder.proj.weight.copy_(adapt_input_conv(embedder.in_channels, source.weight.detach(),
                                                    base_chans=source.in_channels))
        embedder.proj.bias.copy_(source.bias)
    embedder.norm.load_state_dict(body.patch_embed.norm.state_dict())


def mean_pool(tokens: Tensor) -> Tensor:
    """(B, H, W, C) NHWC tokens -> (B, C) features, the mean over all tokens."""
    if tokens.ndim != 4:
        raise ValueError(f"mean_pool expects NHWC tokens (B, H, W, C), got shape {tuple(tokens.shape)}")
    return tokens.mean(dim=(1, 2))
