"""OrcaModel: target embedder f_t -> pretrained Swin body g_s (without its patch embedding) -> head h."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from orca_lora.models.body import body_stride
from orca_lora.models.embedder import Embedder
from orca_lora.models.heads import build_head

BODY_PREFIX = "body."  # the body's module names inside OrcaModel (`body.layers.0.blocks.0.attn.qkv`)


class OrcaModel(nn.Module):
    """head(body.norm(body.layers(embedder(x)))).

    The body keeps timm's module names (`body.layers.0.blocks.0.attn.qkv`), so adapters target
    it through the composed model. Its own `patch_embed` stays inside, frozen and unused by
    `forward`, because the source proxy data is embedded with it (stages 1 and 2).
    """

    def __init__(self, embedder: Embedder, body: nn.Module, head: nn.Module):
        super().__init__()
        self.embedder = embedder
        self.body = body
        self.head = head
        self.body.patch_embed.requires_grad_(False)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) inputs -> the body's normed last-stage tokens (B, h, w, C)."""
        return self.body.norm(self.body.layers(self.embedder(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def build_orca_model(body: nn.Module, in_channels: int, head: str, num_outputs: int,
                     output_size: tuple[int, int] | None, embedder_init: str = "random",
                     seed: int = 0) -> OrcaModel:
    """Compose `body` with a new embedder (`embedder_init`) and a registered `head`; `seed` draws their init.

    `output_size` is the target field's (H, W) for the dense head, None for classification.
    """
    generator = torch.Generator().manual_seed(seed)
    embedder = Embedder.from_body(body, in_channels, init=embedder_init, generator=generator)
    predictor = build_head(head, int(body.num_features), num_outputs, body_stride(body), output_size,
                           generator=generator)
    return OrcaModel(embedder, body, predictor)
