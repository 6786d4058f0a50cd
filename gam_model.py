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
import numbers
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

__all__ = ["ModelConfig", "GAMBlock", "CausalLM", "GAM_Model", "feed_forward"]


_INT_FIELDS = ("VOCAB_SIZE", "BLOCK_SIZE", "N_EMBED", "N_LAYER", "NUM_MEMORY_SLOTS", "CONV_KERNEL_SIZE")
_BOOL_FIELDS = ("USE_GATE", "USE_LOCAL", "USE_GLOBAL")


@dataclass
class ModelConfig:
    """Hyperparameters of the GAM language model (defaults: the paper's model).

    ``USE_GATE``, ``USE_LOCAL`` and ``USE_GLOBAL`` are the Table 3 ablation
    switches. Without the gate the enabled pathways are simply added.

    Types are checked, not guessed: the integer fields accept any integer
    (``numbers.Integral``, so numpy integers too) but not ``bool``, and are stored
    as plain ``int``; ``DROPOUT`` accepts any real in [0, 1), stored as ``float``;
    the three switches accept only ``True`` / ``False`` (the string ``"False"`` is
    truthy, so it is refused rather than silently meaning ``True``). So
    ``to_dict()`` is always JSON-serialisable.
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
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))  # numpy ints -> int: the config stays JSON-able
        p = self.DROPOUT
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
            raise ValueError(f"ModelConfig.DROPOUT must be a number in [0, 1), got {p!r}")
        self.DROPOUT = float(p)
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"ModelConfig.{name} must be True or False, got {value!r}")
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
        # Value checks of forward's inputs (see forward); a plain attribute, not config or state.
        self.check_inputs = True

    def _build_block(self, config: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def num_params(self) -> int:
        """Number of distinct parameters (the tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_idx(self, idx: torch.Tensor, check_length: bool = True) -> torch.Tensor:
        """Type and shape of token ids (metadata only: no device sync); returns them as long.

        Any integer dtype is accepted (uint8/int16/int32 ids from a compact store):
        ``nn.Embedding`` takes only int32/int64 indices, and ``.long()`` is free for long.
        """
        if not isinstance(idx, torch.Tensor):
            raise ValueError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if not _is_integer_dtype(idx.dtype):
            raise ValueError(
                f"idx must hold integer token ids (any integer dtype, e.g. torch.long), got dtype {idx.dtype}"
            )
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, seq_len), got shape {tuple(idx.shape)}")
        if check_length and idx.shape[1] > self.config.BLOCK_SIZE:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds BLOCK_SIZE={self.config.BLOCK_SIZE}; "
                "crop the input or build the model with a larger BLOCK_SIZE"
            )
        return idx.long()

    def _check_targets(self, targets: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Type and shape of targets (no device sync); returns them as long (cross_entropy's dtype)."""
        if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {got}")
        if not _is_integer_dtype(targets.dtype):
            raise ValueError(
                f"targets must hold integer token ids (any integer dtype, e.g. torch.long), got dtype {targets.dtype}"
            )
        if idx.numel() == 0:
            # The mean over zero positions is 0/0: refuse rather than return NaN.
            raise ValueError(
                f"the loss has nothing to score: idx has shape {tuple(idx.shape)} (an empty batch or "
                "seq_len 0); pass at least one token, or call without targets for the (empty) logits"
            )
        return targets.long()

    def _check_values(self, idx: torch.Tensor, targets: torch.Tensor | None) -> None:
        """Value checks of ids and targets with ONE device->host transfer.

        Every statistic is reduced on the device, stacked, and read back by a single
        ``.tolist()``: reading each one separately would stall a GPU once per check.
        """
        if idx.numel() == 0:
            return  # nothing to check (and targets were refused for empty inputs)
        V = self.config.VOCAB_SIZE
        lo, hi = torch.aminmax(idx)
        stats = [lo, hi]
        if targets is not None:
            ignored = targets == -100
            stats += [(~ignored & ((targets < 0) | (targets >= V))).any(), ignored.all()]
        values = torch.stack([s.long() for s in stats]).tolist()  # the one sync
        if values[0] < 0 or values[1] >= V:
            raise ValueError(
                f"token ids must lie in [0, VOCAB_SIZE={V}), got values in [{values[0]}, {values[1]}]"
            )
        if targets is not None and values[2]:
            raise ValueError(f"targets must lie in [0, VOCAB_SIZE={V}) or be -100 (ignored)")
        if targets is not None and values[3]:
            raise ValueError(
                "every target is -100 (ignored): the loss has nothing to score and would be NaN; "
                "keep at least one target in [0, VOCAB_SIZE) or call without targets"
            )

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) integer ids, T <= BLOCK_SIZE; targets: (B, T) or None.

        Returns ``(logits, loss)``: logits (B, T, VOCAB_SIZE); loss is the mean
        cross-entropy over all positions (``-100`` in targets is ignored), or None.

        Ids and targets of any integer dtype are accepted (converted to long).
        ``T = 0`` or ``B = 0`` without targets gives empty (B, T, V) logits; with
        targets it raises, since a mean over nothing is NaN.

        Checks: type, shape and length checks always run (they read metadata only).
        The value checks (ids in [0, VOCAB_SIZE), targets in range or -100, at least
        one target scored) cost one device->host sync per call; set the instance
        attribute ``model.check_inputs = False`` to skip them once the data has been
        validated elsewhere (``benchmark.py`` does at load time). Unchecked bad ids
        then fail inside ``nn.Embedding`` (an IndexError on CPU, a device-side assert
        on CUDA), and all-ignored targets give a NaN loss, as ``F.cross_entropy`` does.
        """
        idx = self._check_idx(idx)
        if targets is not None:
            targets = self._check_targets(targets, idx)
        if self.check_inputs:
            self._check_values(idx, targets)
        logits = self._logits(idx)                                           # (B, T, V)
        loss = None
        if targets is not None:
            B, T = idx.shape
            loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def _logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) long ids, already checked -> (B, T, VOCAB_SIZE) logits."""
        B, T = idx.shape
        pos = torch.arange(T, dtype=torch.long, device=idx.device)           # (T,)
        x = self.dropout(self.token_embedding(idx) + self.pos_embedding(pos))  # (B, T, C)
        if x.numel():  # an empty input stays empty; a convolution would refuse T = 0
            for block in self.blocks:
                x = block(x)                                                 # (B, T, C)
        return self.head(self.ln_f(x))                                       # (B, T, V)

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
        ``temperature`` is any finite real > 0; the logits are shifted by their row
        maximum before the division, so a tiny temperature (even 1e-45, below float32's
        normal range, where it is clamped to the smallest normal number) is greedy
        decoding instead of NaN. The prompt is checked once (values only when
        ``check_inputs``); the sampled ids are valid by construction.
        """
        _check_sampling_args(max_new_tokens, temperature, top_k)
        idx = self._check_idx(idx, check_length=False)  # longer prompts are cropped below
        if idx.shape[1] == 0:
            raise ValueError("idx must hold at least one token to condition on, got seq_len 0")
        if self.check_inputs:
            self._check_values(idx, None)  # the whole prompt, not only the cropped window
        for _ in range(int(max_new_tokens)):
            context = idx[:, -self.config.BLOCK_SIZE:]                       # (B, <=BLOCK_SIZE)
            logits = self._logits(context)[:, -1, :]                         # (B, V)
            next_id = _sample(logits, temperature, top_k, generator)         # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


def _check_sampling_args(max_new_tokens, temperature, top_k) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(
            f"temperature must be a finite number > 0 (e.g. 1.0; smaller is greedier), got {temperature!r}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of (B, V) logits -> (B, 1) ids."""
    # At least float32 (half's range is too small for a small temperature).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # Shift first: the top logit becomes exactly 0, the others <= 0, so dividing by a tiny
    # temperature gives 0 and -inf (never inf - inf = NaN). A temperature below the smallest
    # normal number could round to 0 in the dtype (0 / 0 = NaN): clamp it there.
    t = max(float(temperature), torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / t
    if top_k is not None:
        kth = torch.topk(logits, min(int(top_k), logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


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
