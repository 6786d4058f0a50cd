"""Tests of baselines.py: the Transformer and Mamba baselines and the factories.

CPU only and small, except the exact parameter counts (which only construct the paper's
models). The cases that need CUDA and mamba_ssm (at the end) skip elsewhere; mamba_ssm's
selection logic is tested everywhere with stand-ins.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
from baselines import (
    CausalSelfAttention,
    MambaLM,
    TorchMamba,
    TransformerBlock,
    TransformerLM,
    build_block,
    build_lm,
    build_mamba_mixer,
    mixer_implementation,
)
from gam_model import GAMBlock, GAM_Model, ModelConfig

HAS_CUDA = torch.cuda.is_available()
HAS_MAMBA_SSM = baselines.Mamba is not None
# mambapy is optional (TorchMamba's scan="pscan" only): its cases skip without it.
needs_mambapy = pytest.mark.skipif(baselines.pscan is None, reason="needs mambapy (scan='pscan')")

# The keys (and registration order) of mamba_ssm.Mamba's state_dict.
MAMBA_SSM_KEYS = ["A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias",
                  "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "out_proj.weight"]


def tiny_config(**overrides) -> ModelConfig:
    kw = dict(VOCAB_SIZE=61, BLOCK_SIZE=24, N_EMBED=32, N_LAYER=2, NUM_MEMORY_SLOTS=16, DROPOUT=0.1)
    kw.update(overrides)
    return ModelConfig(**kw)


def mamba_ssm_shapes(d_model, d_state=16, d_conv=4, expand=3):
    """The parameter shapes of mamba_ssm.Mamba(d_model, d_state, d_conv, expand), by hand."""
    D, R = expand * d_model, math.ceil(d_model / 16)
    return {"A_log": (D, d_state), "D": (D,), "in_proj.weight": (2 * D, d_model),
            "conv1d.weight": (D, 1, d_conv), "conv1d.bias": (D,),
            "x_proj.weight": (R + 2 * d_state, D), "dt_proj.weight": (D, R), "dt_proj.bias": (D,),
            "out_proj.weight": (d_model, D)}


# ----------------------------------------------------------------------------------------
# Exact parameter counts at the paper's configuration (ModelConfig())
# ----------------------------------------------------------------------------------------

def test_transformer_param_count_exact():
    model = TransformerLM(ModelConfig())
    assert model.num_params() == 24_166_400
    assert build_lm("transformer", ModelConfig(), attention="sdpa").num_params() == 24_166_400


@pytest.mark.parametrize("residual, expected", [
    pytest.param(False, 20_504_576, id="reference-stacking"),
    pytest.param(True, 20_504_576 + 6 * 2 * 512, id="residual"),
])
def test_mamba_param_count_exact(residual, expected):
    model = build_lm("mamba", ModelConfig(), mamba_residual=residual, mamba_impl="torch")
    assert model.num_params() == expected
    # Per mixer, as mamba_ssm.Mamba(512, d_state=16, d_conv=4, expand=3) by hand.
    per_mixer = sum(math.prod(s) for s in mamba_ssm_shapes(512).values())
    assert per_mixer == 2_542_080
    mixer = model.blocks[0].mixer if residual else model.blocks[0]
    assert sum(p.numel() for p in mixer.parameters()) == per_mixer


# ----------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------

def test_transformer_structure_and_state_dict():
    model = TransformerLM(tiny_config(), n_head=4)
    sd = model.state_dict()
    for key in ["blocks.0.ln_1.weight", "blocks.0.attn.c_attn.weight", "blocks.0.attn.c_attn.bias",
                "blocks.0.attn.c_proj.weight", "blocks.0.attn.c_proj.bias", "blocks.0.ln_2.bias",
                "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias", "ln_f.weight", "head.weight"]:
        assert key in sd, key
    assert sd["blocks.1.attn.c_attn.weight"].shape == (96, 32)
    # Parameters only: the causal mask is not a (persistent or other) buffer.
    assert list(model.buffers()) == []
    assert set(sd) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    ffn = model.blocks[0].ffn
    assert [type(m) for m in ffn] == [nn.Linear, nn.GELU, nn.Linear, nn.Dropout]
    assert ffn[1].approximate == "none"
    assert model.head.weight is model.token_embedding.weight


@pytest.mark.parametrize("attention", [pytest.param("naive", id="naive"), pytest.param("sdpa", id="sdpa")])
def test_attention_matches_torch_multihead_attention(attention):
    """An independent implementation of the same block: nn.MultiheadAttention with our weights."""
    torch.manual_seed(0)
    block = TransformerBlock(tiny_config(), n_head=4, attention=attention).eval()
    C, T = 32, 11
    mha = nn.MultiheadAttention(C, 4, bias=True, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.attn.c_attn.weight)   # q, k, v stacked in that order
        mha.in_proj_bias.copy_(block.attn.c_attn.bias)
        mha.out_proj.weight.copy_(block.attn.c_proj.weight)
        mha.out_proj.bias.copy_(block.attn.c_proj.bias)
        x = torch.randn(3, T, C)
        h = block.ln_1(x)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)     # True = may not attend
        a, _ = mha(h, h, h, attn_mask=mask, need_weights=False)
        expected = x + a
        expected = expected + block.ffn(block.ln_2(expected))
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_head, T", [
    pytest.param(4, 24, id="4heads-T24-full-block"),
    pytest.param(8, 7, id="8heads-T7"),
    pytest.param(1, 1, id="1head-T1"),
])
def test_sdpa_equals_naive(n_head, T):
    torch.manual_seed(1)
    cfg = tiny_config()
    naive = TransformerLM(cfg, n_head=n_head, attention="naive").eval()
    sdpa = TransformerLM(cfg, n_head=n_head, attention="sdpa").eval()
    sdpa.load_state_dict(naive.state_dict())
    idx = torch.randint(0, cfg.VOCAB_SIZE, (3, T))
    logits_n, loss_n = naive(idx, targets=idx)
    logits_s, loss_s = sdpa(idx, targets=idx)
    torch.testing.assert_close(logits_s, logits_n, atol=1e-5, rtol=1e-5)
    loss_n.backward()
    loss_s.backward()
    grads_n = dict(naive.named_parameters())
    for name, p in sdpa.named_parameters():
        torch.testing.assert_close(p.grad, grads_n[name].grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("attention", [pytest.param("naive", id="naive"), pytest.param("sdpa", id="sdpa")])
def test_attention_dropout_only_in_training(attention):
    torch.manual_seed(2)
    attn = CausalSelfAttention(tiny_config(DROPOUT=0.5), n_head=4, attention=attention)
    attn.resid_dropout = nn.Identity()  # isolate the dropout on the attention weights
    x = torch.randn(2, 9, 32)
    attn.train()
    assert not torch.allclose(attn(x), attn(x))
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x), atol=0, rtol=0)


@pytest.mark.parametrize("name, kwargs", [
    pytest.param("transformer", {"attention": "naive"}, id="transformer-naive"),
    pytest.param("transformer", {"attention": "sdpa"}, id="transformer-sdpa"),
    pytest.param("mamba", {}, id="mamba-reference"),
    pytest.param("mamba", {"mamba_residual": True}, id="mamba-residual"),
])
def test_causality(name, kwargs):
    """Changing token t never changes the logits before t (and does change them at t)."""
    torch.manual_seed(3)
    cfg = tiny_config()
    model = build_lm(name, cfg, **kwargs).eval()
    T, t = 20, 13
    idx = torch.randint(0, cfg.VOCAB_SIZE, (2, T))
    idx2 = idx.clone()
    idx2[:, t] = (idx[:, t] + 1) % cfg.VOCAB_SIZE
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(idx2)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4


def test_transformer_block_has_no_length_cap():
    block, impl = build_block("transformer", d_model=32, n_head=4, block_size=8)
    assert impl == "transformer-naive"
    out = block.eval()(torch.randn(1, 40, 32))  # T=40 > block_size=8
    assert out.shape == (1, 40, 32) and torch.isfinite(out).all()


def test_transformer_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        TransformerBlock(tiny_config(), n_head=5)
    with pytest.raises(ValueError, match="naive"):
        TransformerBlock(tiny_config(), n_head=4, attention="flash")
    with pytest.raises(ValueError, match="divisible"):
        TransformerLM(tiny_config(N_EMBED=36))  # default n_head=8; 36 % 8 != 0


# ----------------------------------------------------------------------------------------
# Mamba: the pure-PyTorch mixer against the equations
# ----------------------------------------------------------------------------------------

def reference_mamba(mixer, x):
    """The Mamba mixer written from its equations, with a sequential scan: (B, L, C) -> (B, L, C).

    Independent of the mixer's forward; uses its parameters (so gradients reach them).
    """
    W_in, W_conv, b_conv = mixer.in_proj.weight, mixer.conv1d.weight, mixer.conv1d.bias
    W_x, W_dt, b_dt = mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias
    A_log, D_skip, W_out = mixer.A_log, mixer.D, mixer.out_proj.weight
    Bsz, L, _ = x.shape
    D, N = A_log.shape
    R, K = W_dt.shape[1], W_conv.shape[-1]

    xz = x @ W_in.T                                           # (B, L, 2D)
    xi, z = xz[..., :D], xz[..., D:]
    # Causal depthwise conv: u_t = b + sum_j w_j * x_{t-(K-1)+j}, zero before the start.
    u = []
    for t in range(L):
        acc = b_conv.expand(Bsz, D)
        for j in range(K):
            s = t - (K - 1) + j
            if s >= 0:
                acc = acc + W_conv[:, 0, j] * xi[:, s]
        u.append(acc)
    u = torch.stack(u, dim=1)                                 # (B, L, D)
    u = u * torch.sigmoid(u)                                  # SiLU
    dbc = u @ W_x.T                                           # (B, L, R + 2N)
    dt_low, Bm, Cm = dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]
    dt = torch.log1p(torch.exp(dt_low @ W_dt.T + b_dt))       # softplus, (B, L, D)
    A = -torch.exp(A_log)                                     # (D, N)
    h = torch.zeros(Bsz, D, N, dtype=x.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] * u[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + D_skip * u[:, t])
    y = torch.stack(ys, dim=1)                                # (B, L, D)
    y = y * (z * torch.sigmoid(z))                            # gate with SiLU(z)
    return y @ W_out.T                                        # (B, L, C)


def tiny_mixer(seed=0, scan="chunked"):
    torch.manual_seed(seed)
    mixer, impl = build_mamba_mixer(16, d_state=4, d_conv=4, expand=2, impl="torch")
    assert impl == "mamba-torch-chunked" and type(mixer) is TorchMamba
    mixer.scan = scan
    # Move every parameter away from its init so that each term matters (at init dt is
    # small and the state barely moves), keeping dt = softplus(.) of order 1.
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
        mixer.dt_proj.bias.add_(1.0)
    return mixer


# The chunked scan at its own tiling for these sizes (the batch of 2 in one tile, 64 steps: T = 1,
# 15, 63 within one chunk, 300 in five, the last one short) and at 4 steps in tiles of one row
# (15, 63, 300 end in a short chunk).
@pytest.mark.parametrize("scan, chunk_bytes", [
    pytest.param("chunked", None, id="chunked"),
    pytest.param("chunked", 1, id="chunked-4-steps"),
    pytest.param("pscan", None, id="pscan", marks=needs_mambapy),
])
@pytest.mark.parametrize("dtype, T, mode, tol", [
    pytest.param(torch.float64, 1, "train", 1e-12, id="float64-T1"),
    pytest.param(torch.float64, 15, "train", 1e-12, id="float64-T15-padded-scan"),
    pytest.param(torch.float64, 63, "eval", 1e-12, id="float64-T63-eval"),
    pytest.param(torch.float64, 300, "train", 1e-12, id="float64-T300"),
    pytest.param(torch.float32, 15, "train", 1e-5, id="float32-T15"),
    pytest.param(torch.float32, 63, "train", 1e-5, id="float32-T63"),
    pytest.param(torch.float32, 300, "eval", 1e-5, id="float32-T300-eval"),
])
def test_torch_mamba_matches_sequential_reference(monkeypatch, scan, chunk_bytes, dtype, T, mode, tol):
    """Outputs and all gradients against the equations with explicit loops, in float64."""
    if chunk_bytes is not None:
        monkeypatch.setattr(baselines, "SCAN_CHUNK_BYTES", chunk_bytes)
        assert baselines.scan_tiling(2, 32, 4, 8) == (1, 4)  # and one batch row per tile
    mixer = tiny_mixer(scan=scan).train(mode == "train")
    ref = tiny_mixer()
    ref.load_state_dict(mixer.state_dict())
    mixer, ref = mixer.to(dtype), ref.double()
    torch.manual_seed(1)
    x = torch.randn(2, T, 16, dtype=torch.float64)
    w = torch.randn(2, T, 16, dtype=torch.float64)

    x_ours = x.to(dtype).clone().requires_grad_()
    y_ours = mixer(x_ours)
    assert y_ours.dtype == dtype
    (y_ours * w.to(dtype)).sum().backward()

    x_ref = x.clone().requires_grad_()
    y_ref = reference_mamba(ref, x_ref)
    (y_ref * w).sum().backward()

    assert y_ref.abs().max() > 0.1  # a non-trivial output
    torch.testing.assert_close(y_ours.double(), y_ref.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(x_ours.grad.double(), x_ref.grad, atol=tol, rtol=tol)
    ref_params = dict(ref.named_parameters())
    for name, p in mixer.named_parameters():
        g = ref_params[name].grad
        # relative to the gradient's scale: its entries near zero carry float32 rounding of its big ones
        torch.testing.assert_close(p.grad.double(), g, atol=tol * g.abs().max().item(), rtol=tol, msg=name)


def sequential_scan(dt, A, B, C, u):
    """The selective scan (without D u), step by step: y (B, L, D)."""
    h = dt.new_zeros(dt.shape[0], *A.shape)                   # (B, D, N)
    ys = []
    for t in range(dt.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


def scan_inputs(Bsz, L, D, N, dtype=torch.float64, dt_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = (torch.rand(Bsz, L, D, generator=g, dtype=dtype) + 0.05) * dt_scale
    A = -(torch.rand(D, N, generator=g, dtype=dtype) * 2 + 0.1)
    B, C = (torch.randn(Bsz, L, N, generator=g, dtype=dtype) for _ in range(2))
    u = torch.randn(Bsz, L, D, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (dt, A, B, C, u)]


@pytest.mark.parametrize("Bsz, L, chunk_len, tile", [(2, 1, 4, 2), (2, 5, 1, 2), (2, 7, 3, 2), (2, 8, 4, 2),
                                                      (2, 6, 16, 2), (3, 7, 3, 2), (3, 8, 4, 1), (2, 5, 2, 4)],
                         ids=["T1", "chunk1", "T7-chunk3", "T8-chunk4", "chunk-over-T", "tile-2-of-3",
                              "tile-1", "tile-over-batch"])
def test_selective_scan_gradcheck(Bsz, L, chunk_len, tile):
    inputs = scan_inputs(Bsz, L, 3, 2)
    scan = lambda *a: baselines.selective_scan(*a, chunk_len=chunk_len, tile=tile)  # noqa: E731
    torch.testing.assert_close(scan(*inputs), sequential_scan(*inputs), atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(scan, inputs)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_selective_scan_tiles_that_do_not_divide_the_batch(dtype, tol):
    """Batch 5 in tiles of 2 (the last one a single row), 300 steps in chunks of 8 (the last one
    short), B and C strided views as TorchMamba passes them: outputs and all gradients against
    the float64 steps."""
    ref = scan_inputs(5, 300, 6, 4)
    BC = torch.cat([t.detach() for t in ref[2:4]], dim=-1).to(dtype).requires_grad_()  # (5, 300, 8)
    dt, A, u = (ref[i].detach().to(dtype).requires_grad_() for i in (0, 1, 4))
    w = torch.randn(5, 300, 6, dtype=torch.float64)
    y = baselines.selective_scan(dt, A, BC[..., :4], BC[..., 4:], u, chunk_len=8, tile=2)
    (y * w.to(dtype)).sum().backward()
    y_ref = sequential_scan(*ref)
    (y_ref * w).sum().backward()
    dB_ref, dC_ref = ref[2].grad, ref[3].grad
    for a, b in zip([y, dt.grad, A.grad, BC.grad[..., :4], BC.grad[..., 4:], u.grad],
                    [y_ref.detach(), ref[0].grad, ref[1].grad, dB_ref, dC_ref, ref[4].grad]):
        torch.testing.assert_close(a.double(), b, atol=tol * b.abs().max().item(), rtol=tol)


def test_selective_scan_is_safe_under_large_decays():
    """Log-decays of thousands within one chunk (dt ~ 100, |A| up to 2): nothing overflows and
    float32 still matches the float64 steps, gradients included."""
    ref = scan_inputs(2, 40, 8, 4, dt_scale=100.0)
    ours = [t.detach().float().requires_grad_() for t in ref]
    w = torch.randn(2, 40, 8, dtype=torch.float64)
    y_ref, y = sequential_scan(*ref), baselines.selective_scan(*ours, chunk_len=32)
    (y_ref * w).sum().backward()
    (y * w.float()).sum().backward()
    for a, b in zip([y, *(t.grad for t in ours)], [y_ref, *(t.grad for t in ref)]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.detach(), atol=1e-5 * b.abs().max().item(), rtol=1e-5)


def test_scan_tiling_keeps_a_chunk_buffer_near_1_mib():
    assert baselines.scan_tiling(32, 1536, 16, 4) == (1, 8)     # the paper's size: 96 KiB a row-step
    assert baselines.scan_tiling(16, 384, 16, 4) == (5, 8)      # 24 KiB a row-step; 5 rows do not divide 16
    assert baselines.scan_tiling(16, 384, 16, 8) == (2, 8)      # float64: half the rows
    assert baselines.scan_tiling(2, 32, 4, 8) == (2, 64)        # tiny: the whole batch, the cap on steps
    assert baselines.scan_tiling(1, 8192, 64, 4) == (1, 4)      # 2 MiB a row-step: the floor on steps


@pytest.mark.parametrize("fn", ["softplus", "silu_gate"])
def test_mamba_elementwise_functions_match_autograd_in_float64(fn):
    """TorchMamba's softplus (backward from its output, 1 above the threshold of 20) and SiLU
    gate (backward recomputing silu(z)) against autograd through the torch formulas."""
    torch.manual_seed(0)
    x = torch.linspace(-40, 40, 161, dtype=torch.float64).reshape(7, 23)  # both sides of +-20
    z = torch.randn(7, 23, dtype=torch.float64) * 4
    g = torch.randn(7, 23, dtype=torch.float64)
    if fn == "softplus":
        ours, ref = (lambda a: baselines._Softplus.apply(a)), F.softplus
        inputs = [x]
    else:
        ours, ref = (lambda a, b: baselines._SiLUGate.apply(a, b)), (lambda a, b: a * F.silu(b))
        inputs = [z.flip(0).clone(), z]
    grads = []
    for f in (ours, ref):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = f(*leaves)
        out.backward(g)
        grads.append((out.detach(), *(t.grad for t in leaves)))
    # From its output alone softplus cannot tell x = 20 (sigmoid 1 - e^-20) from x just above it
    # (F.softplus returns x there, gradient 1): within 1e-6 of the threshold they may differ by e^-20.
    edge = (x - 20).abs() < 1e-6 if fn == "softplus" else torch.zeros_like(x, dtype=torch.bool)
    for a, b in zip(*grads):
        torch.testing.assert_close(a[~edge], b[~edge], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(a[edge], b[edge], atol=0, rtol=math.exp(-20) * 1.01)


def test_selective_scan_bad_tile():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="tile"):
            baselines.selective_scan(*scan_inputs(1, 3, 2, 2), tile=bad)


def test_selective_scan_bad_chunk_len():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_len"):
            baselines.selective_scan(*scan_inputs(1, 3, 2, 2), chunk_len=bad)


@pytest.mark.parametrize("scan, name", [("chunked", "selective_scan"),
                                        pytest.param("pscan", "pscan", marks=needs_mambapy)])
def test_torch_mamba_scans_in_float32(monkeypatch, scan, name):
    """Either scan runs in training and eval mode, in float32 under bf16 autocast."""
    calls = []
    real = getattr(baselines, name)

    def recording(*args):
        calls.append([(tuple(a.shape), a.dtype) for a in args])
        return real(*args)

    monkeypatch.setattr(baselines, name, recording)
    mixer = tiny_mixer(scan=scan)
    x = torch.randn(2, 10, 16)
    mixer.train()(x).sum().backward()
    with torch.no_grad():
        y_eval = mixer.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_bf16 = mixer(x)
    shapes = ([(2, 10, 32, 4)] * 2 if scan == "pscan"                      # exp(dt A), dt B u
              else [(2, 10, 32), (32, 4), (2, 10, 4), (2, 10, 4), (2, 10, 32)])  # dt, A, B, C, u
    assert calls == [[(s, torch.float32) for s in shapes]] * 3
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), y_eval, atol=0.05, rtol=0.05)  # bf16 in the projections only


def test_chunked_scan_backward_under_autocast_stays_float32():
    mixer = tiny_mixer()
    x = torch.randn(2, 20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(x).float().sum().backward()  # backward inside the autocast region too
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in mixer.parameters())


def test_torch_mamba_needs_mambapy_only_for_pscan(monkeypatch):
    monkeypatch.setattr(baselines, "pscan", None)
    mixer, impl = build_mamba_mixer(16, impl="torch")  # chunked: no mambapy needed
    assert impl == "mamba-torch-chunked" and mixer(torch.randn(1, 5, 16)).shape == (1, 5, 16)
    with pytest.raises(ImportError, match="mambapy"):
        TorchMamba(16, scan="pscan")
    with pytest.raises(ImportError, match="mambapy"):
        mixer.scan = "pscan"


@needs_mambapy
def test_torch_mamba_scan_choice():
    mixer = tiny_mixer()
    x = torch.randn(2, 9, 16)
    y = mixer(x)
    mixer.scan = "pscan"
    assert mixer_implementation(mixer) == "mamba-torch-pscan"
    torch.testing.assert_close(mixer(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="chunked"):
        mixer.scan = "blelloch"
    with pytest.raises(ValueError, match="chunked"):
        TorchMamba(16, scan="sequential")
    assert mixer.scan == "pscan"


def test_mamba_init_follows_mamba_ssm():
    torch.manual_seed(4)
    d_model, d_state, expand = 64, 16, 3
    mixer, _ = build_mamba_mixer(d_model, d_state=d_state, d_conv=4, expand=expand, impl="torch")
    D, R = expand * d_model, math.ceil(d_model / 16)
    expected_A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(D, d_state)
    torch.testing.assert_close(mixer.A_log.detach(), expected_A_log, atol=0, rtol=0)
    torch.testing.assert_close(mixer.D.detach(), torch.ones(D), atol=0, rtol=0)
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # Log-uniform over [1e-3, 1e-1]: both decades are populated.
    assert dt.min() < 5e-3 and dt.max() > 2e-2
    bound = R ** -0.5
    w = mixer.dt_proj.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None
    assert mixer.conv1d.bias is not None and mixer.dt_proj.bias is not None
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay and mixer.dt_proj.bias._no_reinit


@pytest.mark.parametrize("residual, prefix", [
    pytest.param(False, "blocks.{i}.", id="reference-stacking"),
    pytest.param(True, "blocks.{i}.mixer.", id="residual"),
])
def test_mamba_state_dict_keys_match_mamba_ssm(residual, prefix):
    cfg = tiny_config(N_EMBED=32)
    model = MambaLM(cfg, residual=residual)
    assert model.implementation == "mamba-torch-chunked"
    sd = model.state_dict()
    shapes = mamba_ssm_shapes(32)
    for i in range(cfg.N_LAYER):
        keys = [k for k in sd if k.startswith(f"blocks.{i}.")]
        mixer_keys = [prefix.format(i=i) + k for k in MAMBA_SSM_KEYS]
        norm_keys = [f"blocks.{i}.norm.weight", f"blocks.{i}.norm.bias"] if residual else []
        assert keys == mixer_keys + norm_keys
        for k in MAMBA_SSM_KEYS:
            assert tuple(sd[prefix.format(i=i) + k].shape) == shapes[k], k


def test_mamba_stacking():
    """Reference stacking is x = mixer(x); residual=True is x + mixer(LayerNorm(x))."""
    torch.manual_seed(5)
    plain = MambaLM(tiny_config(N_LAYER=1)).eval()
    res = MambaLM(tiny_config(N_LAYER=1), residual=True).eval()
    x = torch.randn(2, 6, 32)
    mixer = plain.blocks[0]
    assert type(mixer) is TorchMamba
    res.blocks[0].mixer.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        res.blocks[0].norm.weight.fill_(2.0)
        torch.testing.assert_close(plain.blocks[0](x), mixer(x))
        expected = x + mixer(F.layer_norm(x, (32,), res.blocks[0].norm.weight, res.blocks[0].norm.bias))
        torch.testing.assert_close(res.blocks[0](x), expected)


# ----------------------------------------------------------------------------------------
# Factories, implementation selection
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, cls, implementation", [
    pytest.param("gam", {}, GAM_Model, "gam", id="gam"),
    pytest.param("transformer", {}, TransformerLM, "transformer-naive", id="transformer-naive"),
    pytest.param("transformer", {"attention": "sdpa"}, TransformerLM, "transformer-sdpa", id="transformer-sdpa"),
    pytest.param("mamba", {}, MambaLM, "mamba-torch-chunked", id="mamba-cpu-auto"),
    pytest.param("mamba", {"mamba_impl": "torch", "device": "cpu"}, MambaLM, "mamba-torch-chunked", id="mamba-torch"),
])
def test_build_lm(name, kwargs, cls, implementation):
    torch.manual_seed(6)
    cfg = tiny_config()
    model = build_lm(name, cfg, **kwargs)
    assert type(model) is cls
    assert model.implementation == implementation
    idx = torch.randint(0, cfg.VOCAB_SIZE, (2, 10))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (2, 10, cfg.VOCAB_SIZE) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    out = model.eval().generate(idx[:, :3], max_new_tokens=2)
    assert out.shape == (2, 5)


@pytest.mark.parametrize("name, kwargs, make_block", [
    pytest.param("gam", {}, lambda c: GAMBlock(c), id="gam"),
    pytest.param("transformer", {"n_head": 4}, lambda c: TransformerBlock(c, n_head=4), id="transformer"),
    pytest.param("mamba", {"mamba_impl": "torch"},
                 lambda c: build_mamba_mixer(c.N_EMBED, 16, 4, 3, impl="torch")[0], id="mamba"),
])
def test_a_seed_draws_the_parameters_in_the_frames_order(name, kwargs, make_block):
    """torch.manual_seed(s); build_lm(...) draws token embedding, position embedding, the blocks,
    the final norm and the head, in that order (the author's): a seed gives these weights."""
    cfg = tiny_config()
    torch.manual_seed(4)
    model = build_lm(name, cfg, **kwargs)
    torch.manual_seed(4)
    parts = [nn.Embedding(cfg.VOCAB_SIZE, cfg.N_EMBED), nn.Embedding(cfg.BLOCK_SIZE, cfg.N_EMBED),
             *(make_block(cfg) for _ in range(cfg.N_LAYER)), nn.LayerNorm(cfg.N_EMBED),
             nn.Linear(cfg.N_EMBED, cfg.VOCAB_SIZE, bias=False)]
    # The token embedding's draw is consumed, then replaced by the tied head's tensor.
    expected = [p for part in parts[1:] for p in part.parameters()]
    got = [model.pos_embedding.weight, *model.blocks.parameters(), *model.ln_f.parameters(), model.head.weight]
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_implementation_is_the_familys_whichever_way_the_model_is_built():
    cfg = tiny_config()
    assert GAM_Model(cfg).implementation == GAM_Model(cfg, block_impl="reference").implementation == "gam"
    assert TransformerLM(cfg, n_head=4, attention="sdpa").implementation == "transformer-sdpa"
    assert MambaLM(cfg, impl="torch", residual=True).implementation == "mamba-torch-chunked"
    for name in baselines.MODEL_NAMES:
        assert build_lm(name, cfg).implementation == baselines.FAMILIES[name](cfg).implementation


def test_build_lm_passes_family_options():
    cfg = tiny_config()
    tr = build_lm("transformer", cfg, n_head=2, d_state=5)  # d_state: ignored here
    assert tr.blocks[0].attn.n_head == 2 and tr.blocks[0].attn.head_dim == 16
    mb = build_lm("mamba", cfg, n_head=3, d_state=5, d_conv=2, expand=2)  # n_head: ignored here
    assert mb.blocks[0].A_log.shape == (64, 5) and mb.blocks[0].conv1d.weight.shape == (64, 1, 2)


def test_build_lm_errors():
    with pytest.raises(ValueError, match=r"'gam', 'transformer', 'mamba'"):
        build_lm("rnn", tiny_config())
    with pytest.raises(ValueError, match="attention"):
        build_lm("transformer", tiny_config(), attention="flash")
    with pytest.raises(ValueError, match="impl"):
        build_lm("mamba", tiny_config(), mamba_impl="cuda")


def test_mamba_ssm_requested_but_missing(monkeypatch):
    monkeypatch.setattr(baselines, "Mamba", None)
    with pytest.raises(ImportError, match="mamba-ssm"):
        build_mamba_mixer(32, impl="mamba_ssm", device="cuda")


def test_mamba_selection_with_stand_ins(monkeypatch):
    """'auto' takes mamba_ssm only when it imports AND the device is CUDA; 'torch' never does."""
    made = []

    def stand_in(name):
        class StandIn(nn.Module):
            scan = "chunked"  # read by mixer_implementation when it stands in for TorchMamba

            def __init__(self, *args, **kwargs):
                super().__init__()
                made.append((name, args, kwargs))
        return StandIn

    monkeypatch.setattr(baselines, "Mamba", stand_in("mamba_ssm"))
    mixer, impl = build_mamba_mixer(32, impl="auto", device="cpu")
    assert impl == "mamba-torch-chunked" and type(mixer) is TorchMamba and not made
    mixer, impl = build_mamba_mixer(32, impl="auto", device="cuda")
    assert impl == "mamba_ssm" and type(mixer) is baselines.Mamba
    assert made == [("mamba_ssm", (), dict(d_model=32, d_state=16, d_conv=4, expand=3, device=torch.device("cuda")))]
    with pytest.raises(ValueError, match="CUDA"):
        build_mamba_mixer(32, impl="mamba_ssm", device="cpu")
    # An explicit "torch" is honoured on CUDA too (a stand-in: this machine may have no GPU).
    made.clear()
    monkeypatch.setattr(baselines, "TorchMamba", stand_in("torch"))
    mixer, impl = build_mamba_mixer(32, impl="torch", device="cuda")
    assert impl == "mamba-torch-chunked" and [m[0] for m in made] == ["torch"]


@pytest.mark.parametrize("name, implementation, cls", [
    pytest.param("gam", "gam", GAMBlock, id="gam"),
    pytest.param("transformer", "transformer-naive", TransformerBlock, id="transformer"),
    pytest.param("transformer-sdpa", "transformer-sdpa", TransformerBlock, id="transformer-sdpa"),
    pytest.param("mamba", "mamba-torch-chunked", TorchMamba, id="mamba"),
])
def test_build_block(name, implementation, cls):
    block, impl = build_block(name, d_model=32, n_head=4, block_size=8)
    assert impl == implementation
    assert type(block) is cls
    if name == "mamba":
        assert sum(p.numel() for p in block.parameters()) == sum(
            math.prod(s) for s in mamba_ssm_shapes(32).values())
    x = torch.randn(2, 17, 32, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_build_block_gam_config_and_errors():
    block, _ = build_block("gam", d_model=48)
    assert block.memory_bank.shape == (ModelConfig().NUM_MEMORY_SLOTS, 48)
    assert block.causal_conv.weight.shape == (48, 1, ModelConfig().CONV_KERNEL_SIZE)
    with pytest.raises(ValueError, match="transformer-sdpa"):
        build_block("lstm")


# ----------------------------------------------------------------------------------------
# CUDA only: the official kernels against the fallback
# ----------------------------------------------------------------------------------------

needs_mamba_ssm = pytest.mark.skipif(not (HAS_CUDA and HAS_MAMBA_SSM), reason="needs CUDA and mamba_ssm")


@needs_mamba_ssm
def test_mamba_ssm_matches_fallback_on_cuda():
    torch.manual_seed(7)
    official, impl = build_mamba_mixer(64, d_state=16, d_conv=4, expand=3, impl="mamba_ssm", device="cuda")
    assert impl == "mamba_ssm"
    fallback, impl = build_mamba_mixer(64, d_state=16, d_conv=4, expand=3, impl="torch", device="cuda")
    assert impl == "mamba-torch-chunked"
    assert list(fallback.state_dict()) == list(official.state_dict())
    fallback.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 100, 64, device="cuda")
    w = torch.randn_like(x)
    grads = []
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        outs = []
        for m in (official, fallback):
            xi = x.clone().requires_grad_()
            y = m(xi)
            (y * w).sum().backward()
            outs.append(y.detach())
            grads.append(xi.grad)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)
    off = dict(official.named_parameters())
    for name, p in fallback.named_parameters():
        torch.testing.assert_close(p.grad, off[name].grad, atol=1e-3, rtol=1e-2, msg=name)


@needs_mamba_ssm
def test_build_lm_picks_mamba_ssm_on_cuda():
    model = build_lm("mamba", tiny_config(), device="cuda")
    assert model.implementation == "mamba_ssm"
    assert list(model.state_dict()) == list(build_lm("mamba", tiny_config(), mamba_impl="torch").state_dict())
    idx = torch.randint(0, 61, (2, 10), device="cuda")
    _, loss = model(idx, targets=idx)
    assert torch.isfinite(loss)


@needs_mamba_ssm
def test_mamba_ssm_streaming_generate_equals_reencoding():
    """mamba_ssm.Mamba decodes with its own step API (conv and SSM states), crossing BLOCK_SIZE."""
    torch.manual_seed(8)
    model = build_lm("mamba", tiny_config(), device="cuda").eval()
    assert model.implementation == "mamba_ssm"
    idx = torch.randint(0, 61, (3, 2), device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        streamed = model.generate(idx, 30, top_k=1)
        model.use_cache = False
        reencoded = model.generate(idx, 30, top_k=1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert torch.equal(streamed, reencoded)


# ----------------------------------------------------------------------------------------
# The recall control: a Transformer whose first layers mix by GAM's causal convolution


@pytest.mark.parametrize("k, T", [(3, 1), (3, 15), (4, 63), (1, 5)])
def test_causal_conv_matches_a_naive_loop_in_float64(k, T):
    """out[t] = bias + sum_j w[j] x[t-(k-1)+j], zero before the sequence; step in chunks too."""
    torch.manual_seed(k * 100 + T)
    conv = baselines.CausalConv(tiny_config(CONV_KERNEL_SIZE=k, N_EMBED=8)).double()
    x = torch.randn(2, T, 8, dtype=torch.float64)
    w, b = conv.causal_conv.weight[:, 0, :], conv.causal_conv.bias                    # (C, k), (C,)
    expected = torch.stack([b + sum(w[:, j] * x[:, t - (k - 1) + j] for j in range(k) if t - (k - 1) + j >= 0)
                            for t in range(T)], dim=1)                                     # (B, T, C)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected, atol=1e-12, rtol=1e-12)
        cache, outs = None, []
        for start in range(0, T, 2):
            out, cache = conv.step(x[:, start:start + 2], cache)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, atol=1e-12, rtol=1e-12)
    assert cache.shape == (2, k - 1, 8)


def test_conv_layers_put_convolutions_first_and_keep_the_plain_transformer_unchanged():
    cfg = tiny_config(N_LAYER=3)
    torch.manual_seed(0)
    plain = build_lm("transformer", cfg, n_head=4)
    torch.manual_seed(0)
    zero = build_lm("transformer", cfg, n_head=4, conv_layers=0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values()))
    control = build_lm("transformer", cfg, n_head=4, conv_layers=1)
    assert [type(b.mixer).__name__ for b in control.blocks] == ["CausalConv", "CausalSelfAttention",
                                                                 "CausalSelfAttention"]
    assert "blocks.0.conv.causal_conv.weight" in control.state_dict() and "blocks.0.attn.c_attn.weight" not in \
        control.state_dict()
    assert control.implementation == "transformer-naive-conv1" and control.family_config()["conv_layers"] == 1
    assert "conv_layers" not in plain.family_config()  # the paper's model saves as before
    for bad in (-1, 4, True, 1.0):
        with pytest.raises(ValueError, match="conv_layers must be an integer"):
            build_lm("transformer", cfg, conv_layers=bad)


def test_conv_control_is_causal():
    torch.manual_seed(3)
    cfg = tiny_config(DROPOUT=0.0)
    model = build_lm("transformer", cfg, n_head=4, conv_layers=1).eval()
    idx = torch.randint(0, cfg.VOCAB_SIZE, (2, 20))
    idx2 = idx.clone()
    idx2[:, 13] = (idx[:, 13] + 1) % cfg.VOCAB_SIZE
    with torch.no_grad():
        a, b = model(idx)[0], model(idx2)[0]
    torch.testing.assert_close(a[:, :13], b[:, :13], atol=1e-6, rtol=0)
    assert (a[:, 13] - b[:, 13]).abs().max() > 1e-4


def test_embedding_std_redraws_token_and_position_embeddings_only():
    cfg = tiny_config(N_EMBED=64, BLOCK_SIZE=200, VOCAB_SIZE=300)
    torch.manual_seed(0)
    plain = build_lm("transformer", cfg, n_head=4)
    torch.manual_seed(0)
    small = build_lm("transformer", cfg, n_head=4, embedding_std=0.02)
    for name, p in small.named_parameters():
        if "embedding" in name:
            assert abs(p.std().item() - 0.02) < 0.002, name
        else:  # the blocks draw first, as without the option
            assert torch.equal(p, dict(plain.named_parameters())[name]), name
    assert small.head.weight is small.token_embedding.weight  # still tied
    assert plain.pos_embedding.weight.std().item() > 0.5  # the paper's N(0, 1)
    assert small.family_config()["embedding_std"] == 0.02 and "embedding_std" not in plain.family_config()
    for bad in (0, -1.0, float("nan"), True, "0.02"):
        with pytest.raises(ValueError, match="embedding_std must be a positive number"):
            build_lm("transformer", cfg, embedding_std=bad)


def test_ffn_false_leaves_the_ffn_sublayer_out():
    cfg = tiny_config(DROPOUT=0.0)
    model = build_lm("transformer", cfg, n_head=4, ffn=False).eval()
    assert all(b.ffn is None and b.ln_2 is None for b in model.blocks)
    assert not any(".ffn." in k or ".ln_2." in k for k in model.state_dict())
    block, x = model.blocks[0], torch.randn(2, 7, cfg.N_EMBED)
    with torch.no_grad():  # the block is the attention residual alone
        torch.testing.assert_close(block(x), x + block.attn(block.ln_1(x)))
    assert model.family_config()["ffn"] is False
    with pytest.raises(ValueError, match="ffn must be True or False"):
        build_lm("transformer", cfg, ffn="no")
