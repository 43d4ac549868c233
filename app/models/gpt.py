"""A byte-level GPT-style decoder: RoPE positions, RMSNorm, SwiGLU, SDPA / flash-attn."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from app.config.model import GPTConfig
from app.models.transformer import Block, RMSNorm, rope_tables


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_head, cfg.ffn_mult, causal=True, dropout=cfg.dropout, use_flash_attn=cfg.use_flash_attn)
            for _ in range(cfg.n_layer)
        )
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.block_size, cfg.d_model // cfg.n_head, cfg.rope_theta)
        # Non-persistent: derived from the config, so never part of a checkpoint.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 byte ids -> logits (B, T, vocab)."""
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size {self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            x = block(x, rope)
        return self.lm_head(self.norm(x))

    def forward_kv(
        self, idx: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None, last_only: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Incremental decoding with a KV cache (serving); `forward` stays the training/export path.

        idx (B, T) new byte ids; positions (B, T) each token's RoPE position (per row, so
        left-padded prompts of different lengths keep the positions they would have alone);
        mask (B, 1, T, S) bool, True where a query may attend a key, S = cached + T (see
        `decode_mask`); cache: per block the (k, v) of earlier positions, or None. Returns
        logits (B, T, vocab) (or (B, 1, vocab) with `last_only`) and the extended cache.
        """
        if int(positions.max()) >= self.cfg.block_size:
            raise ValueError(f"position {int(positions.max())} is outside model.block_size {self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        cos = self.rope_cos[positions].unsqueeze(1)  # (B, 1, T, hd/2)
        sin = self.rope_sin[positions].unsqueeze(1)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block.forward_kv(x, cos, sin, mask, None if cache is None else cache[i])
            new_cache.append(kv)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)), new_cache

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation of idx (B, T); returns (B, T + new)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.block_size:])[:, -1, :]
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


def decode_mask(key_valid: torch.Tensor, n_new: int) -> torch.Tensor:
    """Attention mask (B, 1, T, S) for `GPT.forward_kv`: the last `n_new` of S keys are the queries.

    key_valid (B, S) bool marks real tokens (False = left padding). A query attends the real
    keys at or before its own position, and always itself: a padding query would otherwise
    have no key at all and SDPA would return NaN there, which then reaches real rows through
    the padding's keys and values.
    """
    B, S = key_valid.shape
    q_pos = torch.arange(S - n_new, S, device=key_valid.device)  # (T,)
    k_pos = torch.arange(S, device=key_valid.device)  # (S,)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    itself = k_pos[None, :] == q_pos[:, None]
    return ((causal[None] & key_valid[:, None, :]) | itself[None])[:, None]  # (B, 1, T, S)
