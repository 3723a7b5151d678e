"""Attention computed one query row at a time, each over exactly the keys it may see.

With the batch-invariant bfloat16 linears (sessions/bf16.py), attention is the one op whose result
for a token depends on the rest of the call: SDPA blocks a 5-query verify differently from a
1-query decode step, so in bfloat16 the two round differently and a speculative step could accept
a token plain decoding would not have produced. Here every query row of a small call (decode,
verify; at most ``MAX_ROWS`` queries per sequence), decode steps included, is computed on its
own over keys 0..position, in float32 (scores, softmax, weighted sum; GQA by grouping the query
heads of each key head): the same computation whatever else the step holds, so a token's logits
no longer depend on how many tokens were verified with it or which other slots ran. The work is
done in C++ (kernels/attention.h, in the bfloat16 kernel's extension: (row, head) pairs split
between threads, each computed whole by one, in a fixed order), with a PyTorch loop as the
fallback where the extension is missing. Prefill chunks (more rows), sliding-window layers and
models whose attention takes extra terms (softcapping, sinks) use plain SDPA. Registered with transformers'
AttentionInterface; sessions on the bfloat16 kernel install it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import bf16

NAME = "spd_rowwise"
MAX_ROWS = 16


def _plain(module, attention_mask, kwargs) -> bool:
    return (getattr(module, "sliding_window", None) is not None
            or (attention_mask is not None and attention_mask.dtype != torch.bool)
            or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks")))


def rowwise_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    batch, heads, rows, dim = query.shape
    if rows > MAX_ROWS or _plain(module, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # the session's masks are causal by position: row (b, s) sees keys 0 .. lengths[b, s] - 1
    if attention_mask is None:  # a plain forward: causal over the call's own keys, as SDPA's is_causal
        n = key.shape[2]
        causal = rows > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True))
        lengths = torch.tensor([[n - rows + 1 + s if causal else n for s in range(rows)]] * batch)
    else:
        lengths = attention_mask[:, 0].sum(-1)
    scale = scaling if scaling is not None else dim ** -0.5
    n_max = int(lengths.max())
    k, v = key[:, :, :n_max].float(), value[:, :, :n_max].float()  # [B, kv_heads, n, D]
    ext = bf16.extension() if query.device.type == "cpu" else None
    if ext is not None:  # the same computation in C++ (kernels/attention.h), without Python's per-row overhead
        out = ext.rowwise_attention(query.float().contiguous(), k.contiguous(), v.contiguous(),
                                    lengths.to(torch.int64).contiguous(), float(scale))
        return out.to(query.dtype), None
    kv_heads = key.shape[1]
    out = query.new_empty(batch, rows, heads, dim)  # the [B, S, H, D] layout attention modules expect
    for b in range(batch):
        q = (query[b].float() * scale).transpose(0, 1).reshape(rows, kv_heads, heads // kv_heads, dim)
        for s, n in enumerate(lengths[b].tolist()):
            p = torch.softmax(torch.matmul(q[s], k[b, :, :n].transpose(1, 2)), dim=-1)
            out[b, s] = torch.matmul(p, v[b, :, :n]).view(heads, dim)
    return out, None


AttentionInterface.register(NAME, rowwise_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
