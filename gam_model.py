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

Two implementations of the block, the same function and state_dict (``GAMBlock(config,
impl=...)``, ``block.impl``, ``GAM_Model(config, block_impl=...)``, ``model.block_impl``):
``"fast"`` (default) is one autograd function with a hand-written backward that saves about
half the activations of ``"reference"``, the equations written as plain modules (as nanoGPT
keeps its manual attention beside the fused one). ``generate`` streams (``model.use_cache``,
default True): each block family hands the LM frame its decoding state (GAM: the last k-1
normalised inputs per layer), so a new token costs one position, not the whole context.

``CausalLM`` is the LM frame the baselines (``baselines.py``) share; ``pretrained.py`` saves
and loads a trained model of any family (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn as nn
from torch.nn import functional as F

__all__ = ["ModelConfig", "check_config", "BLOCK_IMPLS", "GAMBlock", "CausalLM", "GAM_Model", "feed_forward",
           "causal_depthwise_conv"]


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

    @property
    def receptive_field(self) -> int:
        """How many most recent tokens (current one included) GAM's logits at t can depend on:
        only the convolutions mix positions, each reaching k - 1 back."""
        return self.N_LAYER * (self.CONV_KERNEL_SIZE - 1) + 1 if self.USE_LOCAL else 1


def check_config(config) -> None:
    """A model is built from a ModelConfig, nothing else (a dict or None would fail later, obscurely)."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig (for a dict d: ModelConfig(**d)), got {type(config).__name__}")


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


BLOCK_IMPLS = ("fast", "reference")


class GAMBlock(nn.Module):
    """One GAM block: (B, T, C) -> (B, T, C). See the module docstring for the math.

    Two implementations of the same function, with the same parameters and state_dict:

    - ``impl="fast"`` (default): one autograd function with a hand-written backward that
      keeps for backward only the block input, the gate sigmoids, the memory read (gated
      blocks only) and its softmax weights, the residual after the mixer, the FFN
      pre-activation and the dropout mask (bool); the layer norms, the convolution and the
      GELU are recomputed in backward. At B=4, T=2048, C=512 fp32 it keeps 164 MiB where
      the author's block keeps 288 (0.57x), at the same time (see ``_GAMBlockFunction``).
    - ``impl="reference"``: the equations as plain modules, autograd saving what it saves.

    ``impl`` is a constructor argument and a plain attribute (``block.impl = "reference"``),
    not part of ``ModelConfig``: a config describes the function, not how it is computed.
    Both follow autocast (matmuls and the convolution in the autocast dtype, layer norms
    and the softmax in float32).

    ``step(x, cache)`` runs the block on the next positions given the normalised inputs
    of the ``k - 1`` positions before them: the decoding state of ``CausalLM.generate``.
    """

    def __init__(self, config: ModelConfig, impl: str = "fast"):
        super().__init__()
        C, k = config.N_EMBED, config.CONV_KERNEL_SIZE
        self.use_gate, self.use_local, self.use_global = config.USE_GATE, config.USE_LOCAL, config.USE_GLOBAL
        self.kernel_size = k
        self.impl = impl
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

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in BLOCK_IMPLS:
            raise ValueError(f"GAMBlock impl must be one of {BLOCK_IMPLS}, got {value!r}")
        self._impl = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._impl == "fast":
            return self._forward_fast(x)
        return self._forward_reference(x)

    # -- the reference: the equations as written --------------------------------------

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

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)                                    # (B, T, C)
        local = self.local_context(h) if self.use_local else None
        return self._fuse_and_ffn(x, h, local)

    def _fuse_and_ffn(self, x: torch.Tensor, h: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
        """Everything after the convolution: memory read, gate, both residuals, FFN."""
        paths = []
        if self.use_local:
            paths.append(local)
        if self.use_global:
            paths.append(self.global_context(h))
        if self.use_gate:
            gates = self.gate(h).chunk(len(paths), dim=-1)  # n x (B, T, C): g_local, g_global
            fused = sum(torch.sigmoid(g) * p for g, p in zip(gates, paths))
        else:
            fused = sum(paths)                             # Table 3 "no gate": plain sum
        x = x + fused                                      # (B, T, C)
        return x + self.ffn(self.ln2(x))                   # (B, T, C)

    # -- the fast path -----------------------------------------------------------------

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        dropout = self.ffn[3]
        p = dropout.p if dropout.training else 0.0
        conv = self.causal_conv if self.use_local else None
        gate = self.gate if self.use_gate else None
        cast = _autocast_dtype(x.device.type)  # applied by hand inside the function
        settings = (self.ln1.eps, self.ln2.eps, self.ffn[1].approximate, float(p), cast)
        return _GAMBlockFunction.apply(
            x, settings,
            self.ln1.weight, self.ln1.bias,
            None if conv is None else conv.weight, None if conv is None else conv.bias,
            self.memory_bank if self.use_global else None,
            None if gate is None else gate.weight, None if gate is None else gate.bias,
            self.ln2.weight, self.ln2.bias,
            self.ffn[0].weight, self.ffn[0].bias, self.ffn[2].weight, self.ffn[2].bias,
        )

    # -- decoding ----------------------------------------------------------------------

    def step(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block on the next T' positions, given what it needs of the earlier ones.

        x: (B, T', C), the block's input at the next T' positions. cache: (B, k-1, C), the
        normalised inputs ``ln1(x)`` at the k-1 positions before them (zeros before the
        sequence start, which is the convolution's zero padding), or None at the start.
        Returns ``(out (B, T', C), cache for the positions after these)``. The output equals
        ``forward`` on the whole sequence at those positions (the convolution is the only
        part that looks back, and it looks back k-1 normalised inputs).
        """
        h = self.ln1(x)                                    # (B, T', C)
        if not self.use_local:
            return self._fuse_and_ffn(x, h, None), None
        k = self.kernel_size
        if k == 1:
            hh, cache = h, None
        else:
            if cache is None:
                cache = h.new_zeros(h.shape[0], k - 1, h.shape[2])
            hh = torch.cat([cache.to(h.dtype), h], dim=1)   # (B, k-1+T', C)
            cache = hh[:, -(k - 1):]
        # The valid convolution (B, T', C), as k multiply-adds: a tiny conv1d call costs more.
        local = causal_depthwise_conv(hh, self.causal_conv.weight, self.causal_conv.bias)[:, k - 1:]
        return self._fuse_and_ffn(x, h, local), cache


def causal_depthwise_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """out[:, t] = bias + sum_j weight[:, 0, j] * h[:, t-(k-1)+j] (zero before t = 0): k shifted
    multiply-adds on (B, T, C), with no padded copy and no transposes. No autograd."""
    T, k = h.shape[1], weight.shape[-1]
    w = weight[:, 0, :]                                    # (C, k)
    out = torch.addcmul(bias, h, w[:, k - 1])              # shift 0
    for s in range(1, min(k, T)):
        out[:, s:].addcmul_(h[:, :T - s], w[:, k - 1 - s])  # shift s uses tap k-1-s
    return out


class _GAMBlockFunction(torch.autograd.Function):
    """The GAM block with a hand-written backward that stores less.

    Saved for backward, in (B, T, C) units (autograd keeps 18 for the author's block, 19
    for ``impl="reference"`` with its padded copy, the CPU dropout noise in float): the
    input x (1), the gate sigmoids (2 with the gate), the memory read (1, gated blocks with
    memory only), the softmax weights (B, T, S) (1 at S = C), the residual x1 = x + fused
    (1), the FFN pre-activation (4) and the dropout mask (bool, 1/4): 10.25 for the full
    block. Recomputed in backward, all elementwise: ln1(x) and ln2(x1), the convolution
    (k multiply-adds) and GELU(a), so no extra matmul. Recomputing the scores and their
    softmax too would save one more unit, at the cost of one more (B*T, C) x (C, S) matmul in
    backward.

    Autocast: the forward disables autocast and applies its policy by hand (``cast``:
    matmuls and the convolution in that dtype, layer norms and the softmax in float32),
    so the saved tensors and the backward have the dtypes the reference would have.
    """

    @staticmethod
    def forward(ctx, x, settings, ln1_w, ln1_b, conv_w, conv_b, memory, gate_w, gate_b,
                ln2_w, ln2_b, w1, b1, w2, b2):
        eps1, eps2, approximate, p, cast = settings
        with _no_autocast(x):
            to_matmul, to_fp32 = _casts(cast)
            B, T, C = x.shape
            h = torch.native_layer_norm(to_fp32(x), (C,), ln1_w, ln1_b, eps1)[0]   # (B, T, C)
            hc = to_matmul(h)
            paths = []
            if conv_w is not None:
                paths.append(causal_depthwise_conv(hc, to_matmul(conv_w), to_matmul(conv_b)))      # local (B, T, C)
            glob = w = None
            if memory is not None:
                M = to_matmul(memory)
                w = torch.softmax(to_fp32(hc.reshape(-1, C) @ M.t()), dim=-1)    # (B*T, S), saved
                glob = (to_matmul(w) @ M).view(B, T, C)                            # (B, T, C)
                paths.append(glob)
            sig = None
            if gate_w is not None:
                sig = torch.sigmoid(F.linear(hc, to_matmul(gate_w), to_matmul(gate_b)))  # (B, T, n*C)
                fused = paths[0] * sig[..., :C]
                if len(paths) == 2:
                    fused.addcmul_(paths[1], sig[..., C:])
            else:
                fused = paths[0] if len(paths) == 1 else paths[0] + paths[1]
            del paths
            x1 = _add_into(fused, x)                                        # x + fused (B, T, C)
            del fused
            u = torch.native_layer_norm(to_fp32(x1), (C,), ln2_w, ln2_b, eps2)[0]
            a = F.linear(to_matmul(u), to_matmul(w1), to_matmul(b1))                             # (B, T, 4C)
            del u
            y = F.linear(F.gelu(a, approximate=approximate), to_matmul(w2), to_matmul(b2))  # (B, T, C)
            mask = None
            if p > 0:
                y, mask = torch.native_dropout(y, p, True)
            out = _add_into(y, x1)                                          # x1 + y
        ctx.settings = settings
        ctx.save_for_backward(x, sig, glob if sig is not None else None, w, x1, a, mask,
                              ln1_w, ln1_b, conv_w, conv_b, memory, gate_w, gate_b,
                              ln2_w, ln2_b, w1, b1, w2, b2)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        eps1, eps2, approximate, p, cast = ctx.settings
        (x, sig, glob, w, x1, a, mask, ln1_w, ln1_b, conv_w, conv_b, memory, gate_w, gate_b,
         ln2_w, ln2_b, w1, b1, w2, b2) = ctx.saved_tensors
        with _no_autocast(x):
            to_matmul, to_fp32 = _casts(cast)
            B, T, C = x.shape
            N = B * T
            # ---- FFN: out = x1 + dropout(W2 gelu(W1 ln2(x1) + b1) + b2) ----
            dy = dout.to(a.dtype)
            if mask is not None:
                dy = torch.ops.aten.native_dropout_backward(dy, mask, 1.0 / (1.0 - p))
            dy = dy.reshape(N, C)
            df = dy @ to_matmul(w2)                                                # (B*T, 4C)
            da = torch.ops.aten.gelu_backward(df, a.view(N, -1), approximate=approximate)
            # GELU(a) recomputed into df's memory (no fresh 4C buffer): only for W2's gradient.
            f = torch.ops.aten.gelu.out(a.view(N, -1), approximate=approximate, out=df)
            dw2, db2 = dy.t() @ f, dy.sum(0)
            del f, df, dy
            u, mu2, rs2 = torch.native_layer_norm(to_fp32(x1), (C,), ln2_w, ln2_b, eps2)  # recomputed
            dw1, db1 = da.t() @ to_matmul(u).view(N, C), da.sum(0)
            del u
            du = (da @ to_matmul(w1)).view(B, T, C)
            del da
            dx1, dln2_w, dln2_b = torch.ops.aten.native_layer_norm_backward(
                to_fp32(du), to_fp32(x1), (C,), mu2, rs2, ln2_w, ln2_b, [True, True, True])
            del du
            dx1 = _add_into(dx1.to(x1.dtype), dout.to(x1.dtype))           # d x1, = d fused
            # ---- mixer: x1 = x + fused(ln1(x)) ----
            h, mu1, rs1 = torch.native_layer_norm(to_fp32(x), (C,), ln1_w, ln1_b, eps1)  # recomputed
            hc = to_matmul(h)
            dfused = dx1.to(hc.dtype if cast is None else cast)
            dh = None
            dlocal = dglob = dfused
            dconv_w = dconv_b = dmem = dgate_w = dgate_b = None
            if sig is not None:
                # d gate pre-activation (N, n*C): sigmoid' fused, written into its halves, so
                # that the gate's two matmuls stay one each.
                dg = torch.empty(N, sig.shape[-1], dtype=sig.dtype, device=sig.device)
                if conv_w is not None:
                    local = causal_depthwise_conv(hc, to_matmul(conv_w), to_matmul(conv_b))        # recomputed
                    torch.ops.aten.sigmoid_backward.grad_input(
                        dfused * local, sig[..., :C], grad_input=dg[:, :C].view(B, T, C))
                    dlocal = dfused * sig[..., :C]
                    del local
                if memory is not None:
                    s_glob = sig[..., sig.shape[-1] - C:]
                    torch.ops.aten.sigmoid_backward.grad_input(
                        dfused * glob, s_glob, grad_input=dg[:, sig.shape[-1] - C:].view(B, T, C))
                    dglob = dfused * s_glob
                dgate_w, dgate_b = dg.t() @ hc.view(N, C), dg.sum(0)
                dh = (dg @ to_matmul(gate_w)).view(B, T, C)
                del dg
            if conv_w is not None:
                k = conv_w.shape[-1]
                wl = to_matmul(conv_w)[:, 0, :]                                    # (C, k)
                dconv_w = torch.empty_like(wl)
                dconv_b = dlocal.sum((0, 1))
                dh = torch.zeros_like(dlocal) if dh is None else dh.to(dlocal.dtype)
                for s in range(min(k, T)):  # tap k-1-s saw h shifted by s
                    dconv_w[:, k - 1 - s] = (dlocal[:, s:] * hc[:, :T - s]).sum((0, 1))
                    dh[:, :T - s].addcmul_(dlocal[:, s:], wl[:, k - 1 - s])
                dconv_w[:, :max(k - T, 0)] = 0  # taps that only ever saw the zero padding
                dconv_w = dconv_w.unsqueeze(1)
            if memory is not None:
                M = to_matmul(memory)
                h2, dg2 = hc.view(N, C), dglob.reshape(N, C)
                dw = to_fp32(dg2 @ M.t())                                        # (B*T, S)
                dmem = to_matmul(w).t() @ dg2                                      # through the read
                dsc = to_matmul(torch.ops.aten._softmax_backward_data(dw, w, -1, w.dtype))  # w * (dw - <dw, w>)
                del dw
                dmem = dmem.to(memory.dtype) + (dsc.t() @ h2).to(memory.dtype)  # through the scores
                dhm = (dsc @ M).view(B, T, C)
                dh = dhm if dh is None else dh.add_(dhm.to(dh.dtype))
                del dsc, dhm
            dx, dln1_w, dln1_b = torch.ops.aten.native_layer_norm_backward(
                to_fp32(dh), to_fp32(x), (C,), mu1, rs1, ln1_w, ln1_b, [True, True, True])
            dx = _add_into(dx.to(x.dtype), dx1.to(x.dtype))
        return (dx, None, dln1_w, dln1_b, dconv_w, dconv_b, dmem, dgate_w, dgate_b,
                dln2_w, dln2_b, dw1, db1, dw2, db2)


def _add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other, written into ``fresh`` (a temporary nobody else holds) when the result
    type allows: a large new tensor costs page faults on CPU."""
    if fresh.dtype == torch.promote_types(fresh.dtype, other.dtype) and fresh.shape == other.shape:
        return fresh.add_(other)
    return fresh + other


def _casts(cast):
    """(to_matmul, to_fp32): autocast's casts for matmul-like ops and for float32 ops, or identities."""
    if cast is None:
        return (lambda t: t), (lambda t: t)

    def low(t):
        return t if t is None or t.dtype == cast else t.to(cast)

    def high(t):
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    return low, high


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matmuls to on this device type, or None when it is off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
        if available(device_type) and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    if device_type == "cuda" and torch.is_autocast_enabled():  # older torch: per-device functions
        return torch.get_autocast_gpu_dtype()
    if device_type == "cpu" and torch.is_autocast_cpu_enabled():
        return torch.get_autocast_cpu_dtype()
    return None


def _no_autocast(x: torch.Tensor):
    """Autocast off on x's device (the fast block applies its policy by hand)."""
    dev = x.device.type
    available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
    if available(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


class CausalLM(nn.Module):
    """The language-model frame shared by GAM and the baselines of ``baselines.py``.

    token embedding + learned absolute position embedding -> dropout -> blocks
    -> final LayerNorm -> bias-free head tied to the token embedding.

    A model family subclasses it, passes ``make_block`` (called once per layer) and
    defines two names: ``family``, the family's key in ``baselines.FAMILIES`` and in a
    saved model's config.json, and ``implementation``, the name of the code that
    computes it (recorded beside every result). ``family_config()`` returns the
    constructor arguments beyond ModelConfig that change the function.
    """

    family: str          # "gam": defined by each family (a class attribute or a property)
    implementation: str  # "gam", "transformer-naive", ...: likewise

    def __init__(self, config: ModelConfig, make_block: Callable[[], nn.Module]):
        check_config(config)
        super().__init__()
        self.config = config
        C = config.N_EMBED
        # The creation order is the order in which the parameters draw from the RNG (the
        # blocks between the embeddings and the final norm, as in the author's code): keep it,
        # or a seed gives other weights.
        self.token_embedding = nn.Embedding(config.VOCAB_SIZE, C)
        self.pos_embedding = nn.Embedding(config.BLOCK_SIZE, C)
        self.dropout = nn.Dropout(config.DROPOUT)
        self.blocks = nn.ModuleList([make_block() for _ in range(config.N_LAYER)])
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, config.VOCAB_SIZE, bias=False)
        # Tied as in the reference: the shared tensor keeps the head's (Linear) init.
        self.token_embedding.weight = self.head.weight
        # Value checks of forward's inputs (see forward); a plain attribute, not config or state.
        self.check_inputs = True
        # generate: True streams with each block family's decoding state, False re-encodes the
        # cropped context for every new token (the reference). A plain attribute, as above.
        self.use_cache = True

    def family_config(self) -> dict:
        """The constructor arguments beyond ModelConfig that change the function (a saved
        model's config.json keeps them); none here."""
        return {}

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
        lowest, highest = torch.aminmax(idx)
        stats = [lowest, highest]
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
        logits = self.logits(idx)                                            # (B, T, V)
        loss = None
        if targets is not None:
            B, T = idx.shape
            loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """The logits of every position: (B, T) long ids -> (B, T, VOCAB_SIZE).

        ``forward`` without its input checks and loss: idx must be long ids in
        [0, VOCAB_SIZE) with T <= BLOCK_SIZE (forward checks them; this does not).
        """
        return self.head(self._hidden(idx))                                  # (B, T, V)

    def _hidden(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, T) long ids at positions start..start+T-1 -> (B, T, C), after the final LayerNorm."""
        B, T = idx.shape
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.dropout(self.token_embedding(idx) + self.pos_embedding(pos))  # (B, T, C)
        if x.numel():  # an empty input stays empty; a convolution would refuse T = 0
            for block in self.blocks:
                x = block(x)                                                 # (B, T, C)
        return self.ln_f(x)                                                  # (B, T, C)

    # -- decoding: what each block family provides -------------------------------------

    @property
    def _reencode_len(self) -> int:
        """How many trailing tokens of a window decide its last logits (all of them here;
        GAM: its receptive field). Past BLOCK_SIZE, generate re-encodes that many."""
        return self.config.BLOCK_SIZE

    def _can_stream(self) -> bool:
        return all(hasattr(block, "step") for block in self.blocks)

    def _block_step(self, block: nn.Module, x: torch.Tensor, state):
        """One block on the next positions x (B, T', C) given its decoding state (None at the
        start) -> (out (B, T', C), new state). Families whose blocks lack ``block.step(x, state)``
        override this."""
        return block.step(x, state)

    def stream(self, idx: torch.Tensor, start: int, states: list) -> tuple[torch.Tensor, list]:
        """The next tokens of a sequence, given the decoding states of the ones before them.

        idx: (B, T') long ids at positions ``start .. start + T' - 1`` (start + T' <= BLOCK_SIZE;
        not checked, as ``logits``). states: one decoding state per block, from the previous
        call, or ``[None] * len(self.blocks)`` at the start (then start = 0). Returns ``(logits
        (B, VOCAB_SIZE) of the last of these positions, the states after them)``: the logits
        ``logits`` gives on the whole sequence there. Every block needs a decoding step (all
        blocks here have one); ``generate`` with ``use_cache`` decodes through this.
        """
        pos = torch.arange(start, start + idx.shape[1], dtype=torch.long, device=idx.device)  # (T',)
        x = self.dropout(self.token_embedding(idx) + self.pos_embedding(pos))  # (B, T', C)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = self._block_step(block, x, state)
            new_states.append(state)
        return self.head(self.ln_f(x[:, -1])), new_states                    # (B, V)

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

        What is computed per new token is defined by the reference (``model.use_cache =
        False``): the last logits of ``forward`` on the context cropped to its last
        ``BLOCK_SIZE`` tokens. With ``use_cache = True`` (default) the same logits come
        cheaper: while the context fits in ``BLOCK_SIZE``, the prompt is encoded once and
        each new token runs through the blocks alone, with each block's decoding state
        (GAM: the last k-1 normalised inputs per layer; Transformer: a KV cache; Mamba:
        its convolution and SSM states). Once the context is longer, the crop shifts
        every position by one per token, so no state carries over: the last
        ``_reencode_len`` tokens of the window are re-encoded at their window positions
        (GAM: its receptive field, exact by construction; the baselines: the whole window).
        """
        _check_sampling_args(max_new_tokens, temperature, top_k, generator)
        idx = self._check_idx(idx, check_length=False)  # longer prompts are cropped below
        if idx.shape[1] == 0:
            raise ValueError("idx must hold at least one token to condition on, got seq_len 0")
        if self.check_inputs:
            self._check_values(idx, None)  # the whole prompt, not only the cropped window
        out = _output_ids(idx, int(max_new_tokens))                          # (B, T0 + new)
        streaming, states = self.use_cache and self._can_stream(), None
        for length in range(idx.shape[1], out.shape[1]):
            logits, states = self.next_logits(out[:, :length], states, streaming)  # (B, V)
            out[:, length] = _sample(logits, temperature, top_k, generator)[:, 0]
        return out

    def next_logits(self, idx: torch.Tensor, states, streaming: bool) -> tuple[torch.Tensor, list | None]:
        """What ``generate`` computes per new token: the logits (B, V) of the token after idx
        (B, T) long ids, and the decoding states after idx (None where none is kept).

        ``streaming=False``: the last logits of ``forward`` on idx cropped to its last
        BLOCK_SIZE tokens (the reference). ``streaming=True`` (every block needs a decoding
        step): while idx fits in BLOCK_SIZE, ``states`` are those this method returned for
        idx[:, :-1] (or None: idx is encoded from the start); past it, the last
        ``_reencode_len`` tokens of the cropped window are re-encoded (states None). Not
        checked, as ``logits``. Hugging Face's generate decodes through this too (hf_model.py).
        """
        block_size, length = self.config.BLOCK_SIZE, idx.shape[1]
        if not streaming:                                                    # the reference
            return self.logits(idx[:, -block_size:])[:, -1, :], None
        if length <= block_size:
            if states is None:                                               # the prompt, once
                return self.stream(idx, 0, [None] * len(self.blocks))
            return self.stream(idx[:, -1:], length - 1, states)              # the newest token
        n = min(self._reencode_len, block_size)  # cropped window: its last n tokens sit at BLOCK_SIZE-n..
        return self.head(self._hidden(idx[:, -n:], start=block_size - n)[:, -1]), None


def _output_ids(idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The (B, T0 + max_new_tokens) output, allocated once with the prompt in front: a request
    whose ids alone do not fit in memory is refused now, not after hours of decoding."""
    B, T0 = idx.shape
    try:
        out = idx.new_empty(B, T0 + max_new_tokens)
    except (RuntimeError, MemoryError):
        gib = B * (T0 + max_new_tokens) * idx.element_size() / 2**30
        raise ValueError(f"max_new_tokens={max_new_tokens}: the output ids alone need {gib:,.0f} GiB, more "
                         "than can be allocated; generate fewer tokens (in several calls if needed)") from None
    out[:, :T0] = idx
    return out


def _check_sampling_args(max_new_tokens, temperature, top_k, generator=None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(
            f"temperature must be a finite number > 0 (e.g. 1.0; smaller is greedier), got {temperature!r}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be None or a torch.Generator (on the model's device), got {generator!r}")


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

    >>> model = GAM_Model(ModelConfig())               # block_impl="reference": the plain blocks
    >>> logits, loss = model(idx, targets=idx)   # idx: (B, T) long, T <= 256
    """

    family = "gam"
    implementation = "gam"  # both block_impls: the same function, the same parameters

    def __init__(self, config: ModelConfig, block_impl: str = "fast"):
        super().__init__(config, lambda: GAMBlock(config, impl=block_impl))

    @property
    def block_impl(self) -> str:
        """``"fast"`` or ``"reference"``: the implementation of every block (see GAMBlock);
        assign to switch them all. Not part of the config or the state_dict."""
        impls = {block.impl for block in self.blocks}
        return impls.pop() if len(impls) == 1 else "mixed"

    @block_impl.setter
    def block_impl(self, value: str) -> None:
        for block in self.blocks:
            block.impl = value

    @property
    def _reencode_len(self) -> int:
        return self.receptive_field

    @property
    def receptive_field(self) -> int:
        """How many most recent tokens (current one included) the logits at t can depend on."""
        return self.config.receptive_field


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
