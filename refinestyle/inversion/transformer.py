"""Transformer blocks of the inverters: queries attend to themselves, then to image features.

A block (Style Transformer's decoder layer, post-norm as there):

    x = norm1(x + SelfAttention(x))
    x = norm2(x + CrossAttention(x, features))
    x = norm3(x + FeedForward(x))

The grouped block of RefineStyle (paper, section 3.3.1) splits the tokens into groups
of `group_size` consecutive tokens (one group per refined layer) and restricts the
self-attention to each group: a token never sees another group's tokens there. The
cross-attention is not grouped: every token attends to all image features. Grouping is
done by folding the groups into the batch ([B, G*L, C] -> [B*G, L, C]), which costs
nothing and needs no mask.

Attention follows the paper's appendix: 4 heads of dimension 512 each (so the inner
width is 2048 for 512-d tokens), softmax(q k^T / sqrt(head_dim)) v; both configurable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiHeadAttention", "TransformerBlock", "GroupedTransformerBlock"]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with an independent head width.

    dim: channels of the queries and of the output.
    heads, head_dim: number of heads and channels per head (inner width heads * head_dim).
    context_dim: channels of the keys/values source (default `dim`).
    dropout: dropout on the attention weights (training only).

    forward(x [B, N, dim], context [B, M, context_dim] or None for self-attention)
    returns [B, N, dim].
    """

    def __init__(self, dim: int, heads: int = 4, head_dim: int = 512, *, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        context_dim = dim if context_dim is None else context_dim
        self.dim, self.heads, self.head_dim, self.dropout = dim, heads, head_dim, float(dropout)
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(context_dim, inner)
        self.to_v = nn.Linear(context_dim, inner)
        self.to_out = nn.Linear(inner, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        batch, _, length, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to image features, feed-forward (post-norm).

    dim: token channels (the generator's style_dim, 512).
    heads, head_dim: attention heads and their width (paper: 4 and 512).
    ffn_dim: hidden width of the feed-forward network (Style Transformer: 1024).
    dropout: dropout after each sub-layer and on attention weights (training only).
    group_size: None lets every token attend to every other token in the self-attention;
        an integer L restricts it to consecutive groups of L tokens (GroupedTransformerBlock).

    forward(tokens [B, N, dim], features [B, M, dim]) returns [B, N, dim]; with a
    group_size L, N must be a multiple of L.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: int = 512,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        *,
        group_size: int | None = None,
    ):
        super().__init__()
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size: expected None or a positive integer, got {group_size!r}")
        if not isinstance(ffn_dim, int) or ffn_dim < 1:
            raise ValueError(f"ffn_dim: expected a positive integer, got {ffn_dim!r}")
        self.dim, self.group_size = dim, group_size
        self.self_attn = MultiHeadAttention(dim, heads, head_dim, dropout=dropout)
        self.cross_attn = MultiHeadAttention(dim, heads, head_dim, dropout=dropout)
        self.feed_forward = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def _self_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return self.self_attn(tokens)
        batch, count, dim = tokens.shape
        groups = count // self.group_size
        # Fold the groups into the batch: each group attends only to itself.
        folded = tokens.reshape(batch * groups, self.group_size, dim)
        return self.self_attn(folded).reshape(batch, count, dim)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens: expected [B, N, {self.dim}], got {tuple(tokens.shape)}")
        if features.ndim != 3 or features.shape[-1] != self.dim or features.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"features: expected [{tokens.shape[0]}, M, {self.dim}] (batch of tokens), got {tuple(features.shape)}"
            )
        if self.group_size is not None and tokens.shape[1] % self.group_size:
            raise ValueError(
                f"tokens: {tokens.shape[1]} tokens are not a whole number of groups of {self.group_size}"
            )
        x = self.norm1(tokens + self.drop1(self._self_attention(tokens)))
        x = self.norm2(x + self.drop2(self.cross_attn(x, features)))
        return self.norm3(x + self.drop3(self.feed_forward(x)))


class GroupedTransformerBlock(TransformerBlock):
    """RefineStyle's grouped block: self-attention within each group of `group_size` tokens.

    Same arguments as TransformerBlock with `group_size` (L, the tokens per refined layer)
    required. forward(tokens [B, G*L, dim], features [B, M, dim]) -> [B, G*L, dim]; token
    j belongs to group j // L.
    """

    def __init__(self, dim: int, group_size: int, heads: int = 4, head_dim: int = 512, ffn_dim: int = 1024, dropout: float = 0.0):
        super().__init__(dim, heads, head_dim, ffn_dim, dropout, group_size=group_size)
