"""Transformer building blocks shared by the GPT decoder and the ViT.

Pre-norm residual blocks: x + attn(norm(x)), x + mlp(norm(x)). Attention goes through
`F.scaled_dot_product_attention` (which picks a fused kernel per device), or through
flash-attn when it is importable, the tensors live on CUDA and run in fp16/bf16. The
fallback is logged once, not silent.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # optional GPU extra
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]
except ImportError:  # the CPU default: SDPA
    flash_attn_func = None

_FLASH_NOTICE = {"done": False}


def _note_attention_path(msg: str) -> None:
    if not _FLASH_NOTICE["done"]:
        _FLASH_NOTICE["done"] = True
        log.info(msg)


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16/fp16 autocast.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (T, head_dim/2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of the last dim of x (B, nh, T, hd); real arithmetic keeps ONNX export simple."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class SelfAttention(nn.Module):
    """Multi-head self-attention; causal for the decoder, bidirectional for the ViT."""

    def __init__(self, d_model: int, n_head: int, causal: bool, dropout: float = 0.0, use_flash_attn: bool = False):
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.causal = causal
        self.dropout = dropout
        self.use_flash_attn = use_flash_attn
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        drop = self.dropout if self.training else 0.0
        if self._flash_ok(q):
            # flash-attn wants (B, T, nh, hd) in fp16/bf16
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=drop, causal=self.causal)
            y = y.reshape(B, T, C)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=self.causal)
            y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return F.dropout(self.proj(y), drop, self.training)

    def forward_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Incremental attention for decoding with a KV cache (inference only; `forward` is untouched).

        x (B, T, C): the new positions; cos/sin (B, 1, T, hd/2): RoPE tables gathered at each
        row's own positions; mask (B, 1, T, S) bool, True where a query may attend a key, with
        S = cached + T keys; past: the cached (k, v), each (B, nh, S - T, hd). Returns the
        output (B, T, C) and the extended (k, v).
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, S, hd)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)

    def _flash_ok(self, q: torch.Tensor) -> bool:
        if not self.use_flash_attn:
            return False
        if flash_attn_func is None:
            _note_attention_path("flash-attn is not installed: attention uses torch SDPA")
            return False
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            _note_attention_path("flash-attn needs CUDA fp16/bf16 tensors: attention uses torch SDPA here")
            return False
        return True


class SwiGLU(nn.Module):
    """Gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, mult: float, dropout: float = 0.0):
        super().__init__()
        hidden = int(math.ceil(d_model * mult / 8) * 8)
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.down(F.silu(self.gate(x)) * self.up(x)), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, d_model: int, n_head: int, ffn_mult: float, causal: bool, dropout: float, use_flash_attn: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.attn = SelfAttention(d_model, n_head, causal, dropout, use_flash_attn)
        self.norm2 = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, ffn_mult, dropout)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))

    def forward_kv(self, x, cos, sin, mask, past=None):
        """`forward` with a KV cache (see `SelfAttention.forward_kv`); returns (x, (k, v))."""
        h, kv = self.attn.forward_kv(self.norm1(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.norm2(x)), kv
