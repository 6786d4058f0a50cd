"""The paper's baselines: a GPT-style Transformer and a Mamba language model.

Both reuse the LM frame of ``gam_model.CausalLM`` (token + position embedding,
dropout, N_LAYER blocks, final LayerNorm, tied head), so the three models of
the paper differ only in their blocks:

    GAM:          gam_model.GAMBlock
    Transformer:  x = x + Attn(ln_1(x)); x = x + ffn(ln_2(x))      (pre-norm GPT)
    Mamba:        x = mixer(x)                                      (the author's stacking:
                                                                     no residual, no norm)
                  x = x + mixer(norm(x))                            (residual=True: the
                                                                     standard Mamba LM block)

Attention comes in two flavours with the same parameters and the same math:
``"naive"`` materialises the (T, T) score matrix, as the reference scripts (and
so the paper's timings) do; ``"sdpa"`` calls ``F.scaled_dot_product_attention``
(fused, O(T) memory on GPU).

The Mamba mixer is the official ``mamba_ssm.Mamba`` when it is installed and the
model lives on CUDA; otherwise ``TorchMamba``, a plain PyTorch module in the layout of
mamba_ssm's ``mamba_simple.py`` (same parameter names, shapes and initialisation, so
state dicts move between the two) whose selective scan is ``selective_scan``, chunked with a
backward that recomputes each chunk (``scan="chunked"``, the default), or ``mambapy``'s
parallel scan (``scan="pscan"``).

Parameter counts at ``ModelConfig()`` (the paper's config), exact:
Transformer 24,166,400; Mamba (reference stacking) 20,504,576.

Decoding states for ``CausalLM.generate`` (streaming while the context fits in BLOCK_SIZE;
past it the crop shifts every absolute position, so both re-encode the cropped window):
the Transformer a KV cache (``TransformerBlock.step``); Mamba its conv and SSM states
through mamba_ssm's own API (``allocate_inference_cache`` / ``step``), which ``TorchMamba``
implements too, so the official mixer decodes with its own step on CUDA.

``FAMILIES`` is the table of the model families (name -> class: GAM_Model, TransformerLM,
MambaLM); ``build_lm(name, config, ...)`` builds one by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from gam_model import CausalLM, GAMBlock, GAM_Model, ModelConfig, causal_depthwise_conv, check_config, feed_forward

try:  # the official fused kernels; CUDA-only to install, and a broken CUDA build can fail at import
    from mamba_ssm import Mamba
except Exception:
    Mamba = None

try:  # mambapy's parallel (Blelloch) scan, pure PyTorch: TorchMamba's scan="pscan" (optional)
    from mambapy.pscan import pscan
except ImportError:
    pscan = None

__all__ = [
    "ATTENTION_IMPLS",
    "MAMBA_IMPLS",
    "MAMBA_SCANS",
    "FAMILIES",
    "MODEL_NAMES",
    "BLOCK_NAMES",
    "CausalSelfAttention",
    "TransformerBlock",
    "TransformerLM",
    "selective_scan",
    "scan_tiling",
    "TorchMamba",
    "MambaResidualBlock",
    "MambaLM",
    "build_mamba_mixer",
    "mixer_implementation",
    "build_lm",
    "build_block",
]

ATTENTION_IMPLS = ("naive", "sdpa")
MAMBA_IMPLS = ("auto", "mamba_ssm", "torch")
MAMBA_SCANS = ("chunked", "pscan")  # TorchMamba's selective scan
BLOCK_NAMES = ("gam", "transformer", "transformer-sdpa", "mamba")


# ----------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: (B, T, C) -> (B, T, C).

    One fused ``c_attn = Linear(C, 3C)`` (q, k, v in that order), ``n_head`` heads of
    ``C // n_head``, softmax(q k^T / sqrt(head_dim)) under a causal mask, dropout on the
    attention weights, ``c_proj = Linear(C, C)``, dropout. Works for any T (no cap).
    """

    def __init__(self, config: ModelConfig, n_head: int = 8, attention: str = "naive"):
        super().__init__()
        C = config.N_EMBED
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1:
            raise ValueError(f"n_head must be a positive integer, got {n_head!r}")
        if C % n_head != 0:
            raise ValueError(f"N_EMBED={C} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.head_dim = C // n_head
        self.attention = attention
        self.dropout = config.DROPOUT
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.attn_dropout = nn.Dropout(config.DROPOUT)
        self.resid_dropout = nn.Dropout(config.DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                               # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)           # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)           # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)           # (B, nh, T, hd)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )                                                                  # (B, nh, T, hd)
        else:
            # The full (T, T) matrix, as the reference code: this is what makes the
            # paper's Transformer O(T^2) in memory. The mask is built on the fly (not a
            # buffer) so any T works and the state_dict holds parameters only.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
            att = att.masked_fill(~causal, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v                                                        # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                       # (B, T, C)
        return self.resid_dropout(self.c_proj(y))                              # (B, T, C)

    def step(self, x: torch.Tensor, cache: list | None) -> tuple[torch.Tensor, list]:
        """Attention of the next T' positions x (B, T', C) over a KV cache of the earlier ones.

        cache: ``[k, v, n]`` with k, v (B, n_head, capacity, head_dim) buffers holding the
        keys and values of the first n positions, or None at the start. Returns ``(out
        (B, T', C), cache)``, the cache extended in place (reallocated, doubling, when full).
        Same math as ``forward`` at those positions, with the same flavour (naive | sdpa).
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                               # 3 x (B, T', C)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            cache = [None, None, 0]
        kbuf, vbuf, n = cache
        if kbuf is None or n + T > kbuf.shape[2]:
            capacity = max(n + T, 2 * (0 if kbuf is None else kbuf.shape[2]), 64)
            grown = [k.new_empty(B, self.n_head, capacity, self.head_dim) for _ in range(2)]
            if kbuf is not None:
                grown[0][:, :, :n], grown[1][:, :, :n] = kbuf[:, :, :n], vbuf[:, :, :n]
            kbuf, vbuf = grown
        kbuf[:, :, n:n + T], vbuf[:, :, n:n + T] = k, v
        keys, values = kbuf[:, :, :n + T], vbuf[:, :, :n + T]                  # (B, nh, n+T', hd)
        # New query i (position n+i) sees keys 0..n+i; a single new query sees them all.
        allowed = None
        if T > 1:
            allowed = (torch.arange(n + T, device=x.device)[None, :]
                       <= torch.arange(n, n + T, device=x.device)[:, None])     # (T', n+T')
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        else:
            att = (q @ keys.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T', n+T')
            if allowed is not None:
                att = att.masked_fill(~allowed, float("-inf"))
            y = self.attn_dropout(F.softmax(att, dim=-1)) @ values             # (B, nh, T', hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                       # (B, T', C)
        return self.resid_dropout(self.c_proj(y)), [kbuf, vbuf, n + T]


class CausalConv(nn.Module):
    """GAM's local pathway as a token mixer: a causal depthwise convolution of kernel
    ``CONV_KERNEL_SIZE`` (position t sees t-k+1..t), (B, T, C) -> (B, T, C). Its parameter is
    named and initialised as GAMBlock's ``causal_conv``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, self.k = config.N_EMBED, config.CONV_KERNEL_SIZE
        self.causal_conv = nn.Conv1d(C, C, kernel_size=self.k, groups=C, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pad(x.transpose(1, 2), (self.k - 1, 0))                        # (B, C, k-1+T)
        return self.causal_conv(h).transpose(1, 2)                             # (B, T, C)

    def step(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next positions x (B, T', C) given the k-1 inputs before them (cache; None at the
        start: zeros, as the padding); returns (out (B, T', C), the last k-1 inputs)."""
        if cache is None:
            cache = x.new_zeros(x.shape[0], self.k - 1, x.shape[2])
        h = torch.cat([cache, x], dim=1)                                       # (B, k-1+T', C)
        out = self.causal_conv(h.transpose(1, 2)).transpose(1, 2)              # (B, T', C)
        return out, h[:, h.shape[1] - (self.k - 1):]


class TransformerBlock(nn.Module):
    """GPT-style pre-norm block: (B, T, C) -> (B, T, C).

    ``x = x + attn(ln_1(x)); x = x + ffn(ln_2(x))`` with the same FFN as the GAM block.
    ``mixer="conv"`` puts a CausalConv (``conv``) where the attention (``attn``) is; ``ffn=False``
    leaves the FFN sublayer out (``ffn`` is None).
    """

    def __init__(self, config: ModelConfig, n_head: int = 8, attention: str = "naive", mixer: str = "attention",
                 ffn: bool = True):
        super().__init__()
        C = config.N_EMBED
        self.ln_1 = nn.LayerNorm(C)
        if mixer == "conv":
            self.conv = CausalConv(config)
        else:
            self.attn = CausalSelfAttention(config, n_head=n_head, attention=attention)
        self.ln_2 = nn.LayerNorm(C) if ffn else None
        self.ffn = feed_forward(C, config.DROPOUT) if ffn else None  # the same FFN as GAMBlock

    @property
    def mixer(self) -> nn.Module:
        return self.conv if hasattr(self, "conv") else self.attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.ln_1(x))                                       # (B, T, C)
        return x if self.ffn is None else x + self.ffn(self.ln_2(x))           # (B, T, C)

    def step(self, x: torch.Tensor, cache) -> tuple[torch.Tensor, list]:
        """``forward`` at the next positions x (B, T', C) with the mixer's cache (attention: a KV
        cache, see CausalSelfAttention.step; conv: the last k-1 inputs)."""
        a, cache = self.mixer.step(self.ln_1(x), cache)
        x = x + a                                                              # (B, T', C)
        return (x if self.ffn is None else x + self.ffn(self.ln_2(x))), cache


class TransformerLM(CausalLM):
    """The paper's Transformer baseline (24,166,400 parameters at ``ModelConfig()``).

    >>> model = TransformerLM(ModelConfig(), n_head=8, attention="sdpa")
    >>> logits, loss = model(idx, targets=idx)   # idx: (B, T) long, T <= BLOCK_SIZE

    ``conv_layers=n``: the first n blocks mix tokens with GAM's causal convolution instead of
    attention (``CausalConv``): a control for recall, in which the convolution carries each key
    to its value's position and the attention above it looks the key up, as in Zoology's
    MQAR baselines (a short convolution, then attention). ``embedding_std``: the token (and so
    the tied head) and position embeddings drawn from N(0, std) instead of the paper's init,
    whose N(0, 1) positions swamp the token signal at the start. ``ffn=False``: blocks without
    their FFN sublayer. None of these is the paper's model.
    """

    family = "transformer"

    def __init__(self, config: ModelConfig, n_head: int = 8, attention: str = "naive", conv_layers: int = 0,
                 embedding_std: float | None = None, ffn: bool = True):
        check_config(config)  # before conv_layers is checked against it
        if isinstance(conv_layers, bool) or not isinstance(conv_layers, int) or not 0 <= conv_layers <= config.N_LAYER:
            raise ValueError(f"conv_layers must be an integer in [0, N_LAYER={config.N_LAYER}], got {conv_layers!r}")
        if embedding_std is not None and (isinstance(embedding_std, bool) or not isinstance(embedding_std, (int, float))
                                          or not 0 < embedding_std < math.inf):
            raise ValueError(f"embedding_std must be a positive number or None, got {embedding_std!r}")
        mixers = iter(["conv"] * conv_layers + ["attention"] * (config.N_LAYER - conv_layers))
        if not isinstance(ffn, bool):
            raise ValueError(f"ffn must be True or False, got {ffn!r}")
        super().__init__(config, lambda: TransformerBlock(config, n_head=n_head, attention=attention,
                                                          mixer=next(mixers), ffn=ffn))
        self.n_head, self.attention, self.use_ffn = n_head, attention, ffn
        self.conv_layers, self.embedding_std = conv_layers, embedding_std
        if embedding_std is not None:  # drawn after the blocks: a plain Transformer's draws are unchanged
            for embedding in (self.token_embedding, self.pos_embedding):  # the token one is the head's too
                nn.init.normal_(embedding.weight, std=embedding_std)

    @property
    def implementation(self) -> str:
        conv = f"-conv{self.conv_layers}" if self.conv_layers else ""
        return f"transformer-{self.attention}{conv}"  # "transformer-naive", "transformer-sdpa", ...-conv1

    def family_config(self) -> dict:
        return {"n_head": self.n_head, "attention": self.attention,
                **({"conv_layers": self.conv_layers} if self.conv_layers else {}),
                **({"embedding_std": self.embedding_std} if self.embedding_std is not None else {}),
                **({"ffn": False} if not self.use_ffn else {})}


# ----------------------------------------------------------------------------------------
# Mamba
# ----------------------------------------------------------------------------------------

def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.empty(0).device  # the current default device
    return torch.device(device)


# ----------------------------------------------------------------------------------------
# The chunked selective scan of TorchMamba
# ----------------------------------------------------------------------------------------

# A chunk's buffers are (K, b, N, D): K steps of a tile of b batch rows. scan_tiling keeps one near
# SCAN_CHUNK_BYTES, so that the backward's three stay near a core's L2 (2 MiB: lscpu's 4 MiB in 2
# instances) through the ~20 passes each chunk makes over them, and takes K >= 8 steps first, as
# every chunk costs ~40 small ops. Measured on CPU (forward + backward of the scan alone, fp32, 1 thread) at the
# paper's size (B=32, d_inner 1536, d_state 16: 96 KiB a row-step): (b, K) = (1, 8) 1.09 s,
# (1, 4) 1.09 s, (2, 4) 1.17 s, (1, 16) 1.17 s, (32, 4) 1.34 s (one 12 MiB buffer each); the
# earlier untiled (B, D, N) scan with time-major copies of its inputs took 1.58 s. Tiles of
# several rows read strided views (b > 1 is slower at this size) but cut the ops per step at
# small sizes. The backward keeps the state at every chunk start, (L/K, B, N, D): N/K of a
# (B, L, D) activation, 2 of them at the paper's size (96 MiB a layer).
SCAN_CHUNK_BYTES = 2 ** 20


def scan_tiling(batch: int, d_inner: int, d_state: int, itemsize: int) -> tuple[int, int]:
    """(tile, chunk_len) of ``selective_scan`` for a (batch, d_inner, d_state) state of that itemsize:
    batch rows per tile and steps per chunk, a (chunk_len, tile, d_inner, d_state) buffer near
    SCAN_CHUNK_BYTES; chunk_len between 8 and 64 (4 when one row-step is over an eighth of it)."""
    row_steps = max(1, SCAN_CHUNK_BYTES // (d_inner * d_state * itemsize))     # chunk_len * tile
    tile = min(batch, max(1, row_steps // 8))
    steps = max(1, row_steps // tile)
    return tile, min(64, max(4, 2 ** int(math.log2(steps))))


def _chunk_states(h0, dt, At, B, xu, hs, decay):
    """The states of one chunk, time-major, written into the buffers ``hs`` and ``decay``.

    h0 (b, N, D) the state before the chunk; dt, xu = dt u (K, b, D); At = A^T (N, D); B (K, b, N).
    N before D: the broadcasts and C_t . h_t then run along D, contiguous (2x faster bmm here).
    Step by step (K in-place (b, N, D) updates), not a closed form from cumulative log-decays:
    the factored one, exp(cum_t) cumsum_s(exp(-cum_s) x_s), needs exp(+large) once a chunk's
    total decay passes ~88 (float32), and the safe one, exp(cum_t - cum_s) for every s <= t, is
    K times the work, as the decay differs per (d, n). A step only multiplies by exp(dt_t A) <= 1.
    """
    torch.mul(dt.unsqueeze(2), At, out=decay).exp_()                           # (K, b, N, D)
    torch.mul(xu.unsqueeze(2), B.unsqueeze(-1), out=hs)                        # dt_t B_t u_t: (K, b, N, D)
    h, a = hs.unbind(0), decay.unbind(0)                                       # per-step views, made once
    h[0].addcmul_(a[0], h0)
    for k in range(1, len(h)):
        h[k].addcmul_(a[k], h[k - 1])                                          # h_t = exp(dt_t A) h_{t-1} + ...


def _time_major(*tensors):
    return [t.transpose(0, 1) for t in tensors]                               # views: (b, L, .) -> (L, b, .)


def _chunks(L: int, K: int):
    """(index, slice) of each chunk of K steps (the last one shorter when K does not divide L)."""
    return list(enumerate(slice(c, min(c + K, L)) for c in range(0, L, K)))


def _tiles(batch: int, tile: int):
    """Slices of ``tile`` batch rows (the last one shorter when tile does not divide batch)."""
    return [slice(b, min(b + tile, batch)) for b in range(0, batch, tile)]


def _tile_forward(dt, At, B, C, u, y, starts, bufs):
    """The scan of one batch tile of b rows, all views time-major: dt, u, y (L, b, D), B, C (L, b, N);
    writes y and the state before each chunk, starts (L/K, b, N, D)."""
    hs, decay = bufs                                                           # 2 x (K, b, N, D)
    chunks = _chunks(dt.shape[0], hs.shape[0])
    xu = dt * u                                                                # (L, b, D)
    starts[0].zero_()
    for i, s in chunks:
        n = s.stop - s.start
        _chunk_states(starts[i], dt[s], At, B[s], xu[s], hs[:n], decay[:n])
        y[s] = (C[s].unsqueeze(2) @ hs[:n]).squeeze(2)                         # C_t . h_t: (n, b, D)
        if i + 1 < len(chunks):
            starts[i + 1] = hs[n - 1]


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, h_0 = 0 (no D u_t term).

    Forward keeps only the state at each chunk start; backward recomputes a chunk's states from
    it (as mamba_ssm's CUDA kernel recomputes from its inputs), so no (B, L, D, N) tensor is ever
    built or saved: only (K, b, N, D) buffers for a tile of b batch rows, reused across chunks
    and tiles (tiles are independent: the recurrence runs along time only). Inputs and outputs
    stay batch-major; a tile reads them through time-major views, never copied.
    """

    @staticmethod
    def forward(ctx, dt, A, B, C, u, chunk_len, tile):
        (Bs, L, D), N = u.shape, A.shape[1]
        K, b = min(chunk_len, L), min(tile, Bs)
        bufs = [u.new_empty(K, b, N, D) for _ in range(2)]                    # 2 x (K, b, N, D)
        starts = u.new_empty(len(_chunks(L, K)), Bs, N, D)                    # h before each chunk
        y, At = u.new_empty(Bs, L, D), A.t().contiguous()                     # (B, L, D), (N, D)
        for r in _tiles(Bs, b):
            dt_, B_, C_, u_, y_ = _time_major(dt[r], B[r], C[r], u[r], y[r])  # (L, b, .)
            _tile_forward(dt_, At, B_, C_, u_, y_, starts[:, r], [t[:, :r.stop - r.start] for t in bufs])
        ctx.save_for_backward(dt, A, B, C, u, starts)  # the inputs as given: storages shared with other saves
        ctx.chunk_len, ctx.tile = K, b
        return y                                                               # (B, L, D)

    @staticmethod
    @once_differentiable  # a hand-written backward: no graph of its own to differentiate again
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):  # as the forward, also if backward runs under autocast
            return _ChunkedScan._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        dt, A, B, C, u, starts = ctx.saved_tensors
        K, b = ctx.chunk_len, ctx.tile
        bufs = [u.new_empty(K, b, *starts.shape[2:]) for _ in range(3)]        # 3 x (K, b, N, D)
        grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (dt, B, C, u)]
        At, dAt = A.t().contiguous(), A.new_zeros(A.shape[::-1])               # (N, D)
        for r in _tiles(u.shape[0], b):
            _tile_backward(*_time_major(dt[r], B[r], C[r], u[r], dy[r]), At, starts[:, r],
                           [t[:, :r.stop - r.start] for t in bufs], _time_major(*(g[r] for g in grads)), dAt)
        ddt, dB, dC, du = grads                                                # (B, L, .)
        return ddt, dAt.t(), dB, dC, du, None, None


def _tile_backward(dt, B, C, u, dy, At, starts, bufs, grads, dAt):
    """The backward of one tile (time-major views, as ``_tile_forward``), chunks last to first:
    writes d dt, dB, dC, du into ``grads`` (L, b, .) and adds the tile's share to dA^T, dAt."""
    ddt, dB, dC, du = grads
    xu, gB = dt * u, torch.empty_like(u)                                       # dt_t u_t, g_t . B_t: (L, b, D)
    carry = torch.zeros_like(starts[0])                                        # dloss/dh after the chunk, (b, N, D)
    for i, s in reversed(_chunks(dt.shape[0], bufs[0].shape[0])):
        n = s.stop - s.start
        carry = _chunk_backward(starts[i], carry, dt[s], At, B[s], C[s], xu[s], dy[s], [t[:n] for t in bufs],
                                (ddt[s], dB[s], dC[s], gB[s]), dAt)
    torch.mul(gB, dt, out=du)                                                  # d(dt_t u_t) dt_t
    ddt.addcmul_(gB, u)                                                        # + d(dt_t u_t) u_t


def _chunk_backward(h0, carry, dt, At, B, C, xu, dy, bufs, grads, dAt):
    """One chunk of the backward (time-major, as ``_chunk_states``): writes the chunk's part of
    d dt (its q_t . A term), dB, dC and g_t . B_t into ``grads``, adds its share to dA^T; ``carry``
    is exp(dt A) g at the step after the chunk, the same at its first step is returned.

    g_t = dloss/dh_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}; with x_t = dt_t u_t B_t and
    q_t = g_t * exp(dt_t A) h_{t-1} (the gradient of dt_t A):
    dC_t = dy_t . h_t, dB_t = (dt_t u_t) . g_t, d(dt_t u_t) = g_t . B_t,
    d dt_t = q_t . A + u_t (g_t . B_t), dA = sum q_t dt_t.
    """
    hs, decay, gs = bufs                                                       # 3 x (K, b, N, D)
    ddt, dB, dC, gB = grads
    _chunk_states(h0, dt, At, B, xu, hs, decay)                                # recomputed, not stored
    # Row times transposed matrix: MKL's bmm is ~3x faster so than matrix times column here.
    dC.copy_((dy.unsqueeze(2) @ hs.transpose(2, 3)).squeeze(2))                # dy_t . h_t: (K, b, N)
    torch.mul(dy.unsqueeze(2), C.unsqueeze(-1), out=gs)                        # C_t dy_t: (K, b, N, D)
    gs[-1] += carry
    g, a = gs.unbind(0), decay.unbind(0)
    for k in range(len(g) - 2, -1, -1):
        g[k].addcmul_(a[k + 1], g[k + 1])
    carry = a[0] * g[0]                                                        # (b, N, D)
    decay[1:].mul_(hs[:-1])                                                    # decay overwritten by q_t:
    a[0].mul_(h0)
    q = decay.mul_(gs)                                                         # exp(dt_t A) h_{t-1} g_t
    gB.copy_((B.unsqueeze(2) @ gs).squeeze(2))                                 # (K, b, D)
    dB.copy_((xu.unsqueeze(2) @ gs.transpose(2, 3)).squeeze(2))                # (K, b, N)
    # hs and gs are no longer needed: scratch for the two products (an einsum would copy q once more).
    torch.sum(torch.mul(q, At, out=hs), 2, out=ddt)
    dAt += torch.mul(q, dt.unsqueeze(2), out=gs).sum((0, 1))
    return carry


def selective_scan(dt, A, B, C, u, chunk_len: int | None = None, tile: int | None = None) -> torch.Tensor:
    """Mamba's selective scan without the D u skip, chunked: y (B, L, D), y_t = C_t . h_t,
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, h_0 = 0.

    dt, u (B, L, D); A (D, N), negative; B, C (B, L, N); all one floating dtype. Differentiable
    in every input (see ``_ChunkedScan``). Runs in the inputs' dtype: autocast is off inside.
    chunk_len: steps per chunk; tile: batch rows scanned together; None for ``scan_tiling``'s choice.
    """
    auto_tile, auto_len = scan_tiling(u.shape[0], *A.shape, u.element_size())
    chunk_len, tile = auto_len if chunk_len is None else chunk_len, auto_tile if tile is None else tile
    for name, v in (("chunk_len", chunk_len), ("tile", tile)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    with torch.autocast(u.device.type, enabled=False):
        return _ChunkedScan.apply(dt, A, B, C, u, chunk_len, tile)


class _CausalConvSiLU(torch.autograd.Function):
    """SiLU(conv1d(x)[..., :L]) of TorchMamba (depthwise, causal, with bias) on x (B, L, D) as it is,
    float32 or float64, by gam_model's shifted multiply-adds: no transposed or padded copies;
    backward keeps x alone and recomputes the convolution (k multiply-adds), where conv1d and the
    SiLU keep a contiguous copy of x and the SiLU's input: one (B, L, D) tensor less, and fewer
    fresh ones (page faults)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return F.silu(_CausalConvSiLU.conv(x, weight, bias))

    @staticmethod
    def conv(x, weight, bias):
        return causal_depthwise_conv(x, weight.to(x.dtype), bias.to(x.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, weight, bias = ctx.saved_tensors
        L, k = x.shape[1], weight.shape[-1]
        dc = _CausalConvSiLU.conv(x, weight, bias)                             # recomputed
        torch.ops.aten.silu_backward.grad_input(g, dc, grad_input=dc)          # its gradient, in place
        w = weight.to(x.dtype)[:, 0, :]                                        # (D, k)
        dx, dw, scratch = dc * w[:, k - 1], torch.empty_like(w), torch.empty_like(dc)
        for s in range(min(k, L)):  # tap k-1-s saw x shifted by s
            dw[:, k - 1 - s] = torch.mul(dc[:, s:], x[:, :L - s], out=scratch[:, :L - s]).sum((0, 1))
            if s:
                dx[:, :L - s].addcmul_(dc[:, s:], w[:, k - 1 - s])
        dw[:, :max(k - L, 0)] = 0                                              # taps that only saw the padding
        return dx.to(x.dtype), dw.unsqueeze(1).to(weight.dtype), dc.sum((0, 1)).to(bias.dtype)


class _Softplus(torch.autograd.Function):
    """F.softplus keeping its output for backward, not its input (the scan keeps the output
    anyway: one (B, L, D) tensor less): sigmoid(x) = 1 - exp(-softplus(x)) = -expm1(-y), and 1
    above F.softplus's threshold of 20, where it returns x itself, as its own backward (at x = 20
    exactly, y = 20 + 2e-9 reads as above it: a gradient of 1 for 1 - e^-20)."""

    @staticmethod
    def forward(ctx, x):
        y = F.softplus(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, = ctx.saved_tensors
        sig = y.neg().expm1_().neg_().masked_fill_(y > 20, 1)                  # in place: one (B, L, D) buffer
        return sig.mul_(g)


class _SiLUGate(torch.autograd.Function):
    """y * silu(z), keeping y and z for backward, which recomputes silu(z): autograd's
    ``y * F.silu(z)`` keeps silu(z) too, a third (B, L, D) tensor. The same gradients, op for op."""

    @staticmethod
    def forward(ctx, y, z):
        ctx.save_for_backward(y, z)
        return y * F.silu(z)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, z = ctx.saved_tensors
        dz = g * y  # d silu(z), then d z in place: each fresh (B, L, D) tensor costs page faults on CPU
        return F.silu(z).mul_(g), torch.ops.aten.silu_backward.grad_input(dz, z, grad_input=dz)


# Not transformers' MambaMixer: in transformers 5.24 it calls mamba_ssm's CUDA kernels whenever
# mamba_ssm imports, without looking at the tensors' device, so it fails on CPU tensors there.
class TorchMamba(nn.Module):
    """The Mamba mixer in plain PyTorch, a drop-in for ``mamba_ssm.Mamba``: (B, L, C) -> (B, L, C).

    The layout of mamba_ssm's ``mamba_simple.py`` (parameters in_proj, conv1d, x_proj,
    dt_proj, A_log, D, out_proj: same names, shapes, state_dict order and initialisation,
    so state dicts move between the two), d_inner = expand * d_model, dt_rank =
    ceil(d_model / 16), no in/out-proj bias, conv bias on. The selective scan, in training and
    eval mode alike, in at least float32, is ``scan``: ``"chunked"`` (default; ``selective_scan``,
    no dependency) or ``"pscan"`` (mambapy's parallel (Blelloch) scan, which builds several
    (B, L, D, N) tensors: slower and bigger on CPU, kept to compare). The same function either way.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, device=None,
                 scan: str = "chunked"):
        super().__init__()
        self.scan = scan
        D, R = expand * d_model, math.ceil(d_model / 16)
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner, self.dt_rank = D, R
        self.in_proj = nn.Linear(d_model, 2 * D, bias=False, device=device)
        # Padded d_conv - 1 on both sides: the first L outputs are the causal convolution.
        self.conv1d = nn.Conv1d(D, D, d_conv, groups=D, padding=d_conv - 1, bias=True, device=device)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(D, R + 2 * d_state, bias=False, device=device)
        self.dt_proj = nn.Linear(R, D, bias=True, device=device)
        # mamba_ssm.Mamba's initialisation (PyTorch defaults elsewhere), so that both
        # implementations start from the same distribution: dt_proj.weight ~ U(+-R^-0.5);
        # softplus(dt_proj.bias) log-uniform in [1e-3, 1e-1], floored at 1e-4; S4D-real
        # A = -(1..N) per channel; D = 1.
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
            log_lo, log_hi = math.log(1e-3), math.log(1e-1)
            dt = torch.exp(torch.rand(D, device=device) * (log_hi - log_lo) + log_lo).clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(D, 1)
        self.A_log = nn.Parameter(torch.log(A))                                # (D, N)
        self.D = nn.Parameter(torch.ones(D, device=device))                    # (D,)
        self.out_proj = nn.Linear(D, d_model, bias=False, device=device)
        # mamba_ssm's markers, for optimisers and init schemes that honour them.
        self.dt_proj.bias._no_reinit = True
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    @property
    def scan(self) -> str:
        """``"chunked"`` or ``"pscan"``: the selective scan of ``forward`` (``step`` is one step of either)."""
        return self._scan

    @scan.setter
    def scan(self, value: str) -> None:
        if value not in MAMBA_SCANS:
            raise ValueError(f"scan must be one of {MAMBA_SCANS}, got {value!r}")
        if value == "pscan" and pscan is None:
            raise ImportError("scan='pscan' needs mambapy's parallel scan: pip install mambapy; or use scan='chunked'")
        self._scan = value

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, L, d_model) -> (B, L, d_model)."""
        N, R, W = self.d_state, self.dt_rank, self.in_proj.weight
        # in_proj as two products, not one output chunked: backward then keeps z alone, not all of
        # (x, z), and needs no (B, L, 2D) concatenation of their gradients.
        x, z = F.linear(hidden_states, W[:self.d_inner]), F.linear(hidden_states, W[self.d_inner:])  # 2 x (B, L, D)
        if x.dtype in (torch.float32, torch.float64):
            x = _CausalConvSiLU.apply(x, self.conv1d.weight, self.conv1d.bias)  # SiLU(causal conv): (B, L, D)
        else:  # fp16/bf16 (autocast): conv1d's own kernel in that dtype, as mamba_ssm's
            L = x.shape[1]
            x = self.act(self.conv1d(x.transpose(1, 2))[..., :L].transpose(1, 2).contiguous())
        dt, B, C = torch.split(self.x_proj(x), [R, N, N], dim=-1)              # (B,L,R), (B,L,N), (B,L,N)
        dt = _Softplus.apply(self.dt_proj(dt))                                 # (B, L, D)
        # The scan in at least float32, as mamba_ssm's kernels, also under fp16/bf16 autocast.
        f = torch.promote_types(x.dtype, torch.float32)
        dt, B, C, u = dt.to(f), B.to(f), C.to(f), x.to(f)
        A = -torch.exp(self.A_log.to(f))                                       # (D, N)
        if self.scan == "pscan":
            h = pscan(torch.exp(dt.unsqueeze(-1) * A),                         # h_t = exp(dt_t A) h_{t-1}
                      (dt * u).unsqueeze(-1) * B.unsqueeze(2))                 #       + dt_t B_t u_t: (B, L, D, N)
            y = (h @ C.unsqueeze(-1)).squeeze(-1)                              # C_t . h_t: (B, L, D)
        else:
            y = selective_scan(dt, A, B, C, u)                                 # the same, chunked: (B, L, D)
        y = torch.addcmul(y, u, self.D.to(f))                                  # + D u_t, one (B, L, D) tensor
        return self.out_proj(_SiLUGate.apply(y.to(x.dtype), z))                # y * SiLU(z): (B, L, d_model)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 0, dtype=None, **kwargs):
        """Zero decoding states, as mamba_ssm.Mamba's: conv_state (B, D, d_conv), the last
        d_conv conv inputs; ssm_state (B, D, N), in at least float32 (the scan's dtype)."""
        w = self.conv1d.weight
        conv_dtype = w.dtype if dtype is None else dtype
        ssm_dtype = torch.promote_types(conv_dtype, torch.float32)
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=w.device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=w.device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One token, as mamba_ssm.Mamba.step: hidden_states (B, 1, d_model) -> (out (B, 1, d_model),
        conv_state, ssm_state), both states updated in place. The recurrence of ``forward``:
        h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t . h_t + D u_t."""
        N, R = self.d_state, self.dt_rank
        x, z = self.in_proj(hidden_states[:, 0]).chunk(2, dim=-1)              # 2 x (B, D)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = self.act((conv_state * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias)  # (B, D)
        dt, B, C = torch.split(self.x_proj(x), [R, N, N], dim=-1)              # (B,R), (B,N), (B,N)
        dt = F.softplus(self.dt_proj(dt))                                      # (B, D)
        f = torch.promote_types(x.dtype, torch.float32)
        dt, B, C, u = dt.to(f), B.to(f), C.to(f), x.to(f)
        A = -torch.exp(self.A_log.to(f))                                       # (D, N)
        ssm_state.copy_(torch.exp(dt.unsqueeze(-1) * A) * ssm_state
                        + (dt * u).unsqueeze(-1) * B.unsqueeze(1))             # (B, D, N)
        y = (ssm_state.to(f) @ C.unsqueeze(-1)).squeeze(-1) + self.D.to(f) * u  # (B, D)
        out = self.out_proj(y.to(x.dtype) * self.act(z))                       # (B, d_model)
        return out.unsqueeze(1), conv_state, ssm_state


def build_mamba_mixer(
    d_model: int,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 3,
    impl: str = "auto",
    device=None,
) -> tuple[nn.Module, str]:
    """One Mamba mixer (B, T, d_model) -> (B, T, d_model), placed on ``device``.

    The one place that chooses the implementation. impl: ``"mamba_ssm"`` (the official
    CUDA kernels; CUDA only), ``"torch"`` (``TorchMamba``, on any device, CUDA included:
    it never calls mamba_ssm's kernels) or ``"auto"`` (mamba_ssm if it imports and
    ``device`` is CUDA, else torch). Returns ``(mixer, implementation_name)``, the name
    being ``"mamba_ssm"`` or ``"mamba-torch-chunked"`` (TorchMamba's default scan).
    """
    for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if impl not in MAMBA_IMPLS:
        raise ValueError(f"mamba impl must be one of {MAMBA_IMPLS}, got {impl!r}")
    dev = _resolve_device(device)
    if impl == "mamba_ssm" and Mamba is None:
        raise ImportError(
            "impl='mamba_ssm' needs the mamba-ssm package (CUDA only): "
            "pip install mamba-ssm causal-conv1d --no-build-isolation; or use impl='torch'"
        )
    if impl == "mamba_ssm" and dev.type != "cuda":
        raise ValueError(f"impl='mamba_ssm' runs on CUDA only, got device {str(dev)!r}; use impl='torch'")
    if impl != "torch" and Mamba is not None and dev.type == "cuda":
        mixer = Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, device=dev)
    else:
        mixer = TorchMamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, device=dev)
    return mixer, mixer_implementation(mixer)


def mixer_implementation(mixer: nn.Module) -> str:
    """``"mamba-torch-chunked"`` or ``"mamba-torch-pscan"`` for a TorchMamba (by its ``scan``),
    ``"mamba_ssm"`` for the official mixer."""
    return f"mamba-torch-{mixer.scan}" if isinstance(mixer, TorchMamba) else "mamba_ssm"


class MambaResidualBlock(nn.Module):
    """The standard Mamba LM block: x + mixer(norm(x)), (B, T, C) -> (B, T, C).

    Names ``norm`` / ``mixer`` as mamba_ssm's ``Block``. LayerNorm (2C parameters).
    """

    def __init__(self, d_model: int, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer  # registered first, as mamba_ssm's Block (same state_dict order)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))                                    # (B, T, C)


class MambaLM(CausalLM):
    """The paper's Mamba baseline (20,504,576 parameters at ``ModelConfig()``).

    ``residual=False`` (default) stacks the bare mixers, ``x = mixer(x)``, as the reference
    code (no residual, no per-layer norm); state_dict keys are then ``blocks.i.in_proj.weight``,
    ``blocks.i.A_log``, ... like mamba_ssm's Mamba. ``residual=True`` uses
    ``MambaResidualBlock`` (+2C parameters per layer). ``impl``/``device`` choose the mixer
    (see ``build_mamba_mixer``); with ``device`` given the whole model is moved there.
    ``self.implementation`` records the mixer implementation used.
    """

    family = "mamba"

    def __init__(
        self,
        config: ModelConfig,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 3,
        residual: bool = False,
        impl: str = "auto",
        device=None,
    ):
        residual = bool(residual)

        def make_block() -> nn.Module:
            mixer, _ = build_mamba_mixer(config.N_EMBED, d_state, d_conv, expand, impl=impl, device=device)
            return MambaResidualBlock(config.N_EMBED, mixer) if residual else mixer

        super().__init__(config, make_block)
        self.d_state, self.d_conv, self.expand, self.residual, self.impl = d_state, d_conv, expand, residual, impl
        if device is not None:
            self.to(device)

    @property
    def implementation(self) -> str:
        """The mixers' implementation (``impl="auto"`` chooses by device): ``"mamba_ssm"`` or
        ``"mamba-torch-chunked"`` (``"mamba-torch-pscan"`` once its mixers' ``scan`` is set so)."""
        return mixer_implementation(self._mixer(self.blocks[0]))

    def family_config(self) -> dict:
        # Not impl: mamba_ssm and TorchMamba hold the same state_dict; the device decides.
        return {"d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand, "residual": self.residual}

    @staticmethod
    def _mixer(block: nn.Module) -> nn.Module:
        return block.mixer if isinstance(block, MambaResidualBlock) else block

    def _can_stream(self) -> bool:
        mixers = [self._mixer(b) for b in self.blocks]
        return all(hasattr(m, "step") and hasattr(m, "allocate_inference_cache") for m in mixers)

    def _block_step(self, block: nn.Module, x: torch.Tensor, state):
        """Decoding through mamba_ssm's API (``allocate_inference_cache`` / ``step``, one token at
        a time), which TorchMamba implements too, so both mixers decode the same way; on CUDA
        with mamba_ssm this is its own step (its fused update kernels when installed)."""
        mixer = self._mixer(block)
        inp = block.norm(x) if isinstance(block, MambaResidualBlock) else x
        if state is None:
            state = mixer.allocate_inference_cache(x.shape[0], self.config.BLOCK_SIZE, dtype=inp.dtype)
        conv_state, ssm_state = state
        outs = []
        for t in range(x.shape[1]):
            out, conv_state, ssm_state = mixer.step(inp[:, t:t + 1], conv_state, ssm_state)
            outs.append(out)
        y = torch.cat(outs, dim=1)                                             # (B, T', C)
        return (x + y if isinstance(block, MambaResidualBlock) else y), (conv_state, ssm_state)


# ----------------------------------------------------------------------------------------
# The model families, and factories (benchmark.py, scale.py)
# ----------------------------------------------------------------------------------------

# The one table of the model families: family name -> class. build_lm takes these names, and
# pretrained.py finds the class of a saved model's config.json "family" here.
FAMILIES: dict[str, type[CausalLM]] = {cls.family: cls for cls in (GAM_Model, TransformerLM, MambaLM)}
MODEL_NAMES = tuple(FAMILIES)  # ("gam", "transformer", "mamba")


def build_lm(
    name: str,
    config: ModelConfig,
    *,
    attention: str = "naive",
    n_head: int = 8,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 3,
    mamba_residual: bool = False,
    mamba_impl: str = "auto",
    conv_layers: int = 0,
    embedding_std: float | None = None,
    ffn: bool = True,
    device=None,
) -> CausalLM:
    """One of the paper's language models, moved to ``device`` when given.

    name: ``"gam"`` (gam_model.GAM_Model), ``"transformer"`` (``attention`` ``"naive"`` or
    ``"sdpa"``, ``n_head`` heads, the first ``conv_layers`` of them convolutions: see
    TransformerLM) or ``"mamba"`` (``d_state``, ``d_conv``, ``expand``,
    ``mamba_residual``, ``mamba_impl``). Options of the other families are ignored, so one
    call site can build all three. The returned model has an ``implementation`` attribute:
    ``"gam"``, ``"transformer-naive"``, ``"transformer-sdpa"``, ``"mamba_ssm"``,
    ``"mamba-torch-chunked"``.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown model name {name!r}; choose one of {MODEL_NAMES}")
    options = {  # the constructor arguments of the families that take any
        "transformer": dict(n_head=n_head, attention=attention, conv_layers=conv_layers, embedding_std=embedding_std,
                            ffn=ffn),
        "mamba": dict(d_state=d_state, d_conv=d_conv, expand=expand, residual=mamba_residual,
                      impl=mamba_impl, device=device),
    }
    model = FAMILIES[name](config, **options.get(name, {}))
    if device is not None:
        model.to(device)
    return model


def build_block(
    name: str,
    d_model: int = 512,
    *,
    n_head: int = 8,
    device=None,
    block_size: int = 256,
) -> tuple[nn.Module, str]:
    """One layer, (B, T, d_model) -> (B, T, d_model), for the scaling study; on ``device``.

    name: ``"gam"`` (GAMBlock, ModelConfig defaults but N_EMBED=d_model), ``"transformer"``
    (naive attention, as the paper timed), ``"transformer-sdpa"`` or ``"mamba"`` (the bare
    mixer, d_state 16, d_conv 4, expand 3, whichever implementation ``build_mamba_mixer``
    picks for ``device``). ``block_size`` only fills ModelConfig.BLOCK_SIZE: none of these
    blocks limits T. Returns ``(block, implementation_name)``.
    """
    if name not in BLOCK_NAMES:
        raise ValueError(f"unknown block name {name!r}; choose one of {BLOCK_NAMES}")
    dev = _resolve_device(device)
    if name == "mamba":
        return build_mamba_mixer(d_model, d_state=16, d_conv=4, expand=3, impl="auto", device=dev)
    config = ModelConfig(N_EMBED=d_model, BLOCK_SIZE=block_size)
    if name == "gam":
        block, impl_name = GAMBlock(config), "gam"
    else:
        attention = "sdpa" if name == "transformer-sdpa" else "naive"
        block, impl_name = TransformerBlock(config, n_head=n_head, attention=attention), f"transformer-{attention}"
    return block.to(dev), impl_name
