"""A small vision transformer for 8x8 grayscale digits: patches -> pre-norm blocks -> mean pool."""

from __future__ import annotations

import torch
import torch.nn as nn

from app.config.model import ViTConfig
from app.models.transformer import Block, RMSNorm


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.n_patches = (cfg.image_size // p) ** 2
        self.patch_emb = nn.Linear(cfg.in_channels * p * p, cfg.d_model)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.n_patches, cfg.d_model))
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_head, cfg.ffn_mult, causal=False, dropout=cfg.dropout) for _ in range(cfg.n_layer)
        )
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        nn.init.normal_(self.pos_emb, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, n_patches, C*p*p)."""
        B, C, H, W = images.shape
        p = self.cfg.patch_size
        x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) float in [0, 1] -> class logits (B, num_classes)."""
        x = self.patch_emb(self.patchify(images)) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))
