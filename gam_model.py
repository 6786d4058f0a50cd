"""Gated Associative Memory (GAM) language model.

A faithful, self-contained (torch + standard library) implementation of

    R. Acharya, "Gated Associative Memory: A Parallel O(N) Architecture for
    Efficient Sequence Modeling", arXiv:2509.00605 (2025).

One GAM block (x: (B, T, C)):

    h      = LayerNorm_1(x)
    local  = CausalDepthwiseConv1d_k(h)                  # left context only
    w      = softmax(h @ M^T, dim=-1)                    # (B, T, S), no 1/sqrt(C)
    global = w @ M                                       # same M as key and value
    g_l, g_g = Linear(C, 2C)(h).chunk(2)
    x      = x + sigmoid(g_l) * local + sigmoid(g_g) * global
    x      = x + FFN(LayerNorm_2(x))

Note what this means: the memory bank M is shared by every position and every
sequence, so the "global" pathway is a per-token function of h. Only the
convolutions move information across time, and the logits at position t depend
on at most the last ``N_LAYER * (CONV_KERNEL_SIZE - 1) + 1`` tokens (13 for the
paper's model) plus the absolute position t. ``GAM_Model.receptive_field`` gives
that number.

State-dict keys match the author's reference code, so its checkpoints load with
``strict=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

__all__ = ["ModelConfig", "GAMBlock", "CausalLM", "GAM_Model", "feed_forward"]


@dataclass
class ModelConfig:
    """Hyperparameters of the GAM language model (defaults: the paper's model).

    ``USE_GATE``, ``USE_LOCAL`` and ``USE_GLOBAL`` are the Table 3 ablation
    switches. Without the gate the enabled pathways are simply added.
    """

    VOCAB_SIZE: int = 10000
    BLOCK_SIZE: int = 256
    N_EMBED: int = 512
    N_LAYER: int = 6
    DROPOUT: float = 0.1
    NUM_MEMORY_SLOTS: int = 512
    CONV_KERNEL_SIZE: int = 3
    USE_GATE: bool = True
    USE_LOCAL: bool = True
    USE_GLOBAL: bool = True

    def __post_init__(self):
        for name in ("VOCAB_SIZE", "BLOCK_SIZE", "N_EMBED", "N_LAYER", "NUM_MEMORY_SLOTS"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        k = self.CONV_KERNEL_SIZE
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ModelConfig.CONV_KERNEL_SIZE must be an integer >= 1, got {k!r}")
        if not isinstance(self.DROPOUT, (int, float)) or not 0.0 <= self.DROPOUT < 1.0:
            raise ValueError(f"ModelConfig.DROPOUT must be in [0, 1), got {self.DROPOUT!r}")
        if not (self.USE_LOCAL or self.USE_GLOBAL):
            raise ValueError(
                "ModelConfig: at least one pathway must be enabled "
                "(USE_LOCAL=True and/or USE_GLOBAL=True); with both off a GAM block has no mixer"
            )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def feed_forward(n_embed: int, dropout: float) -> nn.Sequential:
    """The FFN of every block here: Linear(C, 4C) -> GELU -> Linear(4C, C) -> Dropout.

    Indices 0 and 2 hold the weights: the reference's key names ``ffn.0`` / ``ffn.2``.
    """
    return nn.Sequential(
        nn.Linear(n_embed, 4 * n_embed),
        nn.GELU(),  # exact (erf) GELU, as the reference
        nn.Linear(4 * n_embed, n_embed),
        nn.Dropout(dropout),
    )


class GAMBlock(nn.Module):
    """One GAM block: (B, T, C) -> (B, T, C). See the module docstring for the math."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, k = config.N_EMBED, config.CONV_KERNEL_SIZE
        self.use_gate, self.use_local, self.use_global = config.USE_GATE, config.USE_LOCAL, config.USE_GLOBAL
        self.kernel_size = k
        self.ln1 = nn.LayerNorm(C)
        if self.use_local:
            # Depthwise, with bias. We pad on the left ourselves (padding=0 here), which
            # equals the reference's "pad k-1 on both sides, keep the first T" with the
            # same (C, 1, k) weight, and computes no outputs that are thrown away.
            self.causal_conv = nn.Conv1d(C, C, kernel_size=k, groups=C, bias=True)
        if self.use_global:
            self.memory_bank = nn.Parameter(torch.empty(config.NUM_MEMORY_SLOTS, C))
            nn.init.xavier_uniform_(self.memory_bank)
        if self.use_gate:
            n_paths = int(self.use_local) + int(self.use_global)
            self.gate = nn.Linear(C, n_paths * C)
        self.ln2 = nn.LayerNorm(C)
        self.ffn = feed_forward(C, config.DROPOUT)

    def local_context(self, h: torch.Tensor) -> torch.Tensor:
        """Causal depthwise convolution over time: (B, T, C) -> (B, T, C)."""
        u = h.transpose(1, 2)                              # (B, C, T)
        u = F.pad(u, (self.kernel_size - 1, 0))            # (B, C, T + k - 1), left context only
        return self.causal_conv(u).transpose(1, 2)         # (B, T, C)

    def global_context(self, h: torch.Tensor) -> torch.Tensor:
        """Associative read of the memory bank: (B, T, C) -> (B, T, C)."""
        scores = h @ self.memory_bank.T                    # (B, T, S), no 1/sqrt(C) scaling
        weights = F.softmax(scores, dim=-1)                # (B, T, S), over the slots
        return weights @ self.memory_bank                  # (B, T, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)                                    # (B, T, C)
        paths = []
        if self.use_local:
            paths.append(self.local_context(h))
        if self.use_global:
            paths.append(self.global_context(h))
        if self.use_gate:
            gates = self.gate(h).chunk(len(paths), dim=-1)  # n x (B, T, C): g_local, g_global
            fused = sum(torch.sigmoid(g) * p for g, p in zip(gates, paths))
        else:
            fused = sum(paths)                             # Table 3 "no gate": plain sum
        x = x + fused                                      # (B, T, C)
        return x + self.ffn(self.ln2(x))                   # (B, T, C)


class CausalLM(nn.Module):
    """The language-model frame shared by GAM and the baselines of ``benchmark.py``.

    token embedding + learned absolute position embedding -> dropout -> blocks
    -> final LayerNorm -> bias-free head tied to the token embedding.
    Subclasses implement ``_build_block(config)``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C = config.N_EMBED
        self.token_embedding = nn.Embedding(config.VOCAB_SIZE, C)
        self.pos_embedding = nn.Embedding(config.BLOCK_SIZE, C)
        self.dropout = nn.Dropout(config.DROPOUT)
        self.blocks = nn.ModuleList([self._build_block(config) for _ in range(config.N_LAYER)])
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, config.VOCAB_SIZE, bias=False)
        # Tied as in the reference: the shared tensor keeps the head's (Linear) init.
        self.token_embedding.weight = self.head.weight

    def _build_block(self, config: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def num_params(self) -> int:
        """Number of distinct parameters (the tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_idx(self, idx: torch.Tensor, check_length: bool = True) -> None:
        if not isinstance(idx, torch.Tensor):
            raise ValueError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"idx must hold integer token ids (e.g. torch.long), got dtype {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, seq_len), got shape {tuple(idx.shape)}")
        T, V = idx.shape[1], self.config.VOCAB_SIZE
        if check_length and T > self.config.BLOCK_SIZE:
            raise ValueError(
                f"sequence length {T} exceeds BLOCK_SIZE={self.config.BLOCK_SIZE}; "
                "crop the input or build the model with a larger BLOCK_SIZE"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
            raise ValueError(
                f"token ids must lie in [0, VOCAB_SIZE={V}), got values in "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) integer ids, T <= BLOCK_SIZE; targets: (B, T) or None.

        Returns ``(logits, loss)``: logits (B, T, VOCAB_SIZE); loss is the mean
        cross-entropy over all positions (``-100`` in targets is ignored), or None.
        """
        self._check_idx(idx)
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
                got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {got}")
            if targets.dtype.is_floating_point or targets.dtype == torch.bool:
                raise ValueError(f"targets must hold integer token ids, got dtype {targets.dtype}")
            valid = (targets == -100) | ((targets >= 0) & (targets < self.config.VOCAB_SIZE))
            if not bool(valid.all()):
                raise ValueError(
                    f"targets must lie in [0, VOCAB_SIZE={self.config.VOCAB_SIZE}) or be -100 (ignored)"
                )
        B, T = idx.shape
        pos = torch.arange(T, dtype=torch.long, device=idx.device)           # (T,)
        x = self.dropout(self.token_embedding(idx) + self.pos_embedding(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)                                                     # (B, T, C)
        logits = self.head(self.ln_f(x))                                     # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T0); returns (B, T0 + max_new_tokens).

        The context is cropped to the last ``BLOCK_SIZE`` tokens. Call ``model.eval()``
        first to disable dropout. Seed with ``torch.manual_seed`` or pass ``generator``.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if not temperature > 0 or math.isinf(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        if isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.shape[1] == 0:
            raise ValueError("idx must hold at least one token to condition on, got seq_len 0")
        self._check_idx(idx, check_length=False)  # longer prompts are cropped below
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.BLOCK_SIZE:]                       # (B, <=BLOCK_SIZE)
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature                          # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


class GAM_Model(CausalLM):
    """The GAM language model of the paper (22,599,680 parameters at the defaults).

    >>> model = GAM_Model(ModelConfig())
    >>> logits, loss = model(idx, targets=idx)   # idx: (B, T) long, T <= 256
    """

    def _build_block(self, config: ModelConfig) -> nn.Module:
        return GAMBlock(config)

    @property
    def receptive_field(self) -> int:
        """How many most recent tokens (current one included) the logits at t can depend on."""
        c = self.config
        return c.N_LAYER * (c.CONV_KERNEL_SIZE - 1) + 1 if c.USE_LOCAL else 1


if __name__ == "__main__":
    # The usage example of the paper's repository.
    config = ModelConfig(
        VOCAB_SIZE=10000, BLOCK_SIZE=256, N_EMBED=512, N_LAYER=6, NUM_MEMORY_SLOTS=512, CONV_KERNEL_SIZE=3
    )
    model = GAM_Model(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    print(f"Model initialized with {model.num_params():,} parameters.")
    dummy_input = torch.randint(0, config.VOCAB_SIZE, (8, 128), device=device)
    logits, loss = model(dummy_input, targets=dummy_input)
    print(f"Output logits shape: {logits.shape}")
    print(f"Calculated loss: {loss.item()}")
    print(f"Receptive field: {model.receptive_field} tokens (+ absolute position)")
