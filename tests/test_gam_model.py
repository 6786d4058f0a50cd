"""Tests of gam_model.py against the paper's GAM block and the author's reference code
(github.com/rishiraj/gam: its state_dict keys, shapes and parameter counts).

The forward pass is checked against an independent float64 reference written
here from the equations (naive loops, explicit softmax / LayerNorm / GELU), not
against anything the implementation computes itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO

from cuda_checks import count_tensor_reads
from gam_model import GAM_Model, ModelConfig

LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by the reference code


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tensors here are tiny: intra-op threads only add contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------
# Small configurations
# --------------------------------------------------------------------------

SMALL = dict(VOCAB_SIZE=50, BLOCK_SIZE=16, N_EMBED=8, N_LAYER=2, NUM_MEMORY_SLOTS=6, CONV_KERNEL_SIZE=3)

# (USE_GATE, USE_LOCAL, USE_GLOBAL)
VARIANTS = [
    pytest.param(dict(USE_GATE=True, USE_LOCAL=True, USE_GLOBAL=True), id="full"),
    pytest.param(dict(USE_GATE=False, USE_LOCAL=False, USE_GLOBAL=True), id="global_only"),
    pytest.param(dict(USE_GATE=False, USE_LOCAL=True, USE_GLOBAL=True), id="sum_fusion"),
    pytest.param(dict(USE_GATE=False, USE_LOCAL=True, USE_GLOBAL=False), id="local_only"),
    pytest.param(dict(USE_GATE=True, USE_LOCAL=False, USE_GLOBAL=True), id="gated_global_only"),
    pytest.param(dict(USE_GATE=True, USE_LOCAL=True, USE_GLOBAL=False), id="gated_local_only"),
]


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides})


def make_model(seed: int = 0, double: bool = True, **overrides) -> GAM_Model:
    torch.manual_seed(seed)
    model = GAM_Model(small_config(**overrides))
    if double:
        model = model.double()
    return model.eval()


def rand_idx(cfg: ModelConfig, B: int = 2, T: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    T = cfg.BLOCK_SIZE if T is None else T
    return torch.randint(0, cfg.VOCAB_SIZE, (B, T), generator=g)


# --------------------------------------------------------------------------
# Independent float64 reference (the paper's block equations), reading upstream key names
# --------------------------------------------------------------------------


def ref_layernorm(x, w, b):
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]  # biased variance
    return (x - mean) / torch.sqrt(var + LN_EPS) * w + b


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def ref_linear(x, w, b=None):
    y = torch.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b


def ref_causal_depthwise_conv(h, weight, bias):
    """h (B, T, C); weight (C, 1, k): out[t, c] = bias[c] + sum_j w[c, 0, j] * h[t - (k-1) + j, c]."""
    B, T, C = h.shape
    k = weight.shape[-1]
    out = torch.zeros_like(h)
    for b in range(B):
        for t in range(T):
            acc = bias.clone()
            for j in range(k):
                src = t - (k - 1) + j
                if src >= 0:  # zero padding on the left only
                    acc = acc + weight[:, 0, j] * h[b, src, :]
            out[b, t, :] = acc
    return out


def ref_memory_read(h, M):
    scores = torch.einsum("btc,sc->bts", h, M)  # no 1/sqrt(C) scaling
    e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    w = e / e.sum(dim=-1, keepdim=True)
    return torch.einsum("bts,sc->btc", w, M)


def ref_forward(sd: dict, idx: torch.Tensor, cfg: ModelConfig, keep_graph: bool = False) -> torch.Tensor:
    """keep_graph: sd holds float64 leaves that require grad (for reference gradients)."""
    if not keep_graph:
        sd = {k: v.detach().to(torch.float64) for k, v in sd.items()}
    B, T = idx.shape
    C = cfg.N_EMBED
    tok = sd["token_embedding.weight"][idx]  # (B, T, C)
    pos = sd["pos_embedding.weight"][:T]  # (T, C)
    x = tok + pos
    for i in range(cfg.N_LAYER):
        p = f"blocks.{i}."
        h = ref_layernorm(x, sd[p + "ln1.weight"], sd[p + "ln1.bias"])
        paths = []
        if cfg.USE_LOCAL:
            paths.append(ref_causal_depthwise_conv(h, sd[p + "causal_conv.weight"], sd[p + "causal_conv.bias"]))
        if cfg.USE_GLOBAL:
            paths.append(ref_memory_read(h, sd[p + "memory_bank"]))
        if cfg.USE_GATE:
            g = ref_linear(h, sd[p + "gate.weight"], sd[p + "gate.bias"])
            assert g.shape[-1] == len(paths) * C
            fused = sum(ref_sigmoid(g[..., n * C:(n + 1) * C]) * path for n, path in enumerate(paths))
        else:
            fused = sum(paths)
        x = x + fused
        h2 = ref_layernorm(x, sd[p + "ln2.weight"], sd[p + "ln2.bias"])
        f = ref_gelu(ref_linear(h2, sd[p + "ffn.0.weight"], sd[p + "ffn.0.bias"]))
        x = x + ref_linear(f, sd[p + "ffn.2.weight"], sd[p + "ffn.2.bias"])
    x = ref_layernorm(x, sd["ln_f.weight"], sd["ln_f.bias"])
    return ref_linear(x, sd["head.weight"])  # bias-free head


def ref_cross_entropy(logits, targets):
    m = logits.max(dim=-1, keepdim=True).values
    logz = m.squeeze(-1) + torch.log(torch.exp(logits - m).sum(-1))
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return (logz - picked).mean()


def upstream_keys(cfg: ModelConfig) -> set[str]:
    """The upstream GAM_Model key set, written from the author's reference code (the one
    statement of it here; every test that needs the keys uses this)."""
    keys = {"token_embedding.weight", "pos_embedding.weight", "ln_f.weight", "ln_f.bias", "head.weight"}
    for i in range(cfg.N_LAYER):
        keys |= {
            f"blocks.{i}.ln1.weight", f"blocks.{i}.ln1.bias",
            f"blocks.{i}.ln2.weight", f"blocks.{i}.ln2.bias",
            f"blocks.{i}.ffn.0.weight", f"blocks.{i}.ffn.0.bias",
            f"blocks.{i}.ffn.2.weight", f"blocks.{i}.ffn.2.bias",
        }
        if cfg.USE_LOCAL:
            keys |= {f"blocks.{i}.causal_conv.weight", f"blocks.{i}.causal_conv.bias"}
        if cfg.USE_GLOBAL:
            keys.add(f"blocks.{i}.memory_bank")
        if cfg.USE_GATE:
            keys |= {f"blocks.{i}.gate.weight", f"blocks.{i}.gate.bias"}
    return keys


def random_upstream_state_dict(cfg: ModelConfig, seed: int = 123) -> dict:
    """Upstream-named tensors of the right shapes, built without touching the model."""
    g = torch.Generator().manual_seed(seed)
    V, T, C, S, k = cfg.VOCAB_SIZE, cfg.BLOCK_SIZE, cfg.N_EMBED, cfg.NUM_MEMORY_SLOTS, cfg.CONV_KERNEL_SIZE

    def r(*shape, scale=0.5):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    emb = r(V, C)
    sd = {"token_embedding.weight": emb, "pos_embedding.weight": r(T, C),
          "ln_f.weight": 1 + r(C, scale=0.1), "ln_f.bias": r(C, scale=0.1), "head.weight": emb.clone()}
    n_paths = int(cfg.USE_LOCAL) + int(cfg.USE_GLOBAL)
    for i in range(cfg.N_LAYER):
        p = f"blocks.{i}."
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = 1 + r(C, scale=0.1), r(C, scale=0.1)
        sd[p + "ln2.weight"], sd[p + "ln2.bias"] = 1 + r(C, scale=0.1), r(C, scale=0.1)
        sd[p + "ffn.0.weight"], sd[p + "ffn.0.bias"] = r(4 * C, C), r(4 * C, scale=0.1)
        sd[p + "ffn.2.weight"], sd[p + "ffn.2.bias"] = r(C, 4 * C, scale=0.2), r(C, scale=0.1)
        if cfg.USE_LOCAL:
            sd[p + "causal_conv.weight"], sd[p + "causal_conv.bias"] = r(C, 1, k), r(C, scale=0.1)
        if cfg.USE_GLOBAL:
            sd[p + "memory_bank"] = r(S, C)
        if cfg.USE_GATE:
            sd[p + "gate.weight"], sd[p + "gate.bias"] = r(n_paths * C, C), r(n_paths * C, scale=0.1)
    assert set(sd) == upstream_keys(cfg)
    return sd


# --------------------------------------------------------------------------
# 1. Parameter counts at the paper configuration, weight tying
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, expected",
    [
        pytest.param(dict(), 22_599_680, id="full"),
        pytest.param(dict(USE_GATE=False, USE_LOCAL=False), 19_435_520, id="global_only"),
        pytest.param(dict(USE_GATE=False), 19_447_808, id="sum_fusion"),
        pytest.param(dict(USE_GATE=False, USE_GLOBAL=False), 17_874_944, id="local_only"),
    ],
)
def test_paper_parameter_counts(flags, expected):
    model = GAM_Model(ModelConfig(**flags))
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == expected
    assert model.num_params() == expected


def test_head_tied_to_token_embedding():
    model = make_model(double=False)
    assert model.head.weight is model.token_embedding.weight
    sd = model.state_dict()
    assert sd["head.weight"].data_ptr() == sd["token_embedding.weight"].data_ptr()
    # A change to one is seen by the other.
    with torch.no_grad():
        model.token_embedding.weight[3, 0] = 7.0
    assert model.head.weight[3, 0].item() == 7.0


# --------------------------------------------------------------------------
# 2. Forward pass and loss against the float64 reference
# --------------------------------------------------------------------------


IMPLS = [pytest.param("fast", id="fast"), pytest.param("reference", id="reference")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [pytest.param(1, id="k1"), pytest.param(3, id="k3"), pytest.param(4, id="k4")])
@pytest.mark.parametrize("flags", VARIANTS)
def test_forward_matches_float64_reference(flags, k, impl):
    model = make_model(CONV_KERNEL_SIZE=k, **flags)
    model.block_impl = impl
    cfg = model.config
    # Non-trivial LayerNorm affine parameters so they are exercised too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(("ln1.bias", "ln2.bias", "ln_f.bias")):
                p.add_(0.1 * torch.randn_like(p))
    idx = rand_idx(cfg, B=2, T=cfg.BLOCK_SIZE)
    targets = rand_idx(cfg, B=2, T=cfg.BLOCK_SIZE, seed=2)
    with torch.no_grad():
        logits, loss = model(idx, targets=targets)
    ref = ref_forward(model.state_dict(), idx, cfg)
    assert logits.dtype == torch.float64
    assert logits.shape == (2, cfg.BLOCK_SIZE, cfg.VOCAB_SIZE)
    assert (logits - ref).abs().max().item() < 1e-10
    assert abs(loss.item() - ref_cross_entropy(ref, targets).item()) < 1e-10


def test_forward_shorter_than_block_size_and_no_targets():
    model = make_model()
    idx = rand_idx(model.config, B=3, T=5)
    with torch.no_grad():
        logits, loss = model(idx)
    assert loss is None
    assert (logits - ref_forward(model.state_dict(), idx, model.config)).abs().max().item() < 1e-10


# --------------------------------------------------------------------------
# 3. Causality
# --------------------------------------------------------------------------


@pytest.mark.parametrize("flags", VARIANTS[:4])
def test_causality(flags):
    model = make_model(**flags)
    cfg = model.config
    T = cfg.BLOCK_SIZE
    idx = rand_idx(cfg, B=2, T=T)
    with torch.no_grad():
        base, _ = model(idx)
        for t in (0, 3, 7, T - 2):
            changed = idx.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(T - t - 1)) % cfg.VOCAB_SIZE
            assert not torch.equal(changed[:, t + 1:], idx[:, t + 1:])
            out, _ = model(changed)
            assert (out[:, : t + 1] - base[:, : t + 1]).abs().max().item() <= 1e-12
            # Sanity: the changed future does change the future logits.
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max().item() > 1e-6


# --------------------------------------------------------------------------
# 4. Receptive field
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_layer, k",
    [pytest.param(2, 3, id="L2_k3"), pytest.param(3, 2, id="L3_k2"),
     pytest.param(2, 4, id="L2_k4"), pytest.param(2, 1, id="L2_k1")],
)
def test_receptive_field_is_tight(n_layer, k):
    model = make_model(N_LAYER=n_layer, CONV_KERNEL_SIZE=k)
    cfg = model.config
    reach = n_layer * (k - 1)
    assert model.receptive_field == reach + 1
    idx = rand_idx(cfg, B=2)
    with torch.no_grad():
        base, _ = model(idx)
        for t in (reach, reach + 2, cfg.BLOCK_SIZE - 1):
            first = t - reach  # earliest position the logits at t may depend on
            if first > 0:
                older = idx.clone()
                older[:, :first] = (older[:, :first] + 7) % cfg.VOCAB_SIZE
                out, _ = model(older)
                assert (out[:, t] - base[:, t]).abs().max().item() <= 1e-12
            edge = idx.clone()
            edge[:, first] = (edge[:, first] + 11) % cfg.VOCAB_SIZE
            out, _ = model(edge)
            assert (out[:, t] - base[:, t]).abs().max().item() > 1e-6


@pytest.mark.parametrize("gate", [pytest.param(False, id="no_gate"), pytest.param(True, id="gated")])
def test_global_only_is_per_token(gate):
    model = make_model(USE_GATE=gate, USE_LOCAL=False)
    cfg = model.config
    assert model.receptive_field == 1
    T = cfg.BLOCK_SIZE
    idx = rand_idx(cfg, B=2)
    with torch.no_grad():
        base, _ = model(idx)
        # Every other token changed: logits at t depend only on (token t, position t).
        other = (idx + 1 + torch.arange(T)) % cfg.VOCAB_SIZE
        for t in (0, 5, T - 1):
            mixed = other.clone()
            mixed[:, t] = idx[:, t]
            out, _ = model(mixed)
            assert (out[:, t] - base[:, t]).abs().max().item() <= 1e-12
        # ... and on position: the same token at two positions gives different logits.
        same = torch.full((1, T), 4)
        out, _ = model(same)
        assert (out[0, 0] - out[0, 1]).abs().max().item() > 1e-6


# --------------------------------------------------------------------------
# 5. Upstream state_dict keys, strict loading, checkpoint round trip
# --------------------------------------------------------------------------

def test_state_dict_keys_and_shapes_match_upstream():
    model = make_model(double=False)
    sd = model.state_dict()
    assert set(sd) == upstream_keys(model.config)
    assert len(sd) == 5 + 2 * 13  # the full block has 13 tensors, as the author's
    V, T, C, S, k = 50, 16, 8, 6, 3
    expected_shapes = {
        "token_embedding.weight": (V, C), "pos_embedding.weight": (T, C), "head.weight": (V, C),
        "ln_f.weight": (C,), "ln_f.bias": (C,),
        "blocks.0.memory_bank": (S, C), "blocks.0.causal_conv.weight": (C, 1, k),
        "blocks.0.causal_conv.bias": (C,), "blocks.0.gate.weight": (2 * C, C), "blocks.0.gate.bias": (2 * C,),
        "blocks.0.ffn.0.weight": (4 * C, C), "blocks.0.ffn.0.bias": (4 * C,),
        "blocks.0.ffn.2.weight": (C, 4 * C), "blocks.0.ffn.2.bias": (C,),
        "blocks.0.ln1.weight": (C,), "blocks.0.ln2.bias": (C,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key


@pytest.mark.parametrize("flags", VARIANTS)
def test_ablation_state_dict_keys(flags):
    model = make_model(double=False, **flags)
    assert set(model.state_dict()) == upstream_keys(model.config)


@pytest.mark.parametrize("flags", [VARIANTS[0], VARIANTS[3], VARIANTS[4]])
def test_load_independent_upstream_state_dict(flags):
    cfg = small_config(**flags)
    sd = random_upstream_state_dict(cfg)
    torch.manual_seed(99)
    model = GAM_Model(cfg).double().eval()
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    idx = rand_idx(cfg, B=2)
    with torch.no_grad():
        logits, _ = model(idx)
    ref = ref_forward(sd, idx, cfg)
    assert (logits - ref).abs().max().item() < 1e-10


def test_checkpoint_round_trip(tmp_path):
    model = make_model(seed=3, double=False)
    path = tmp_path / "gam.pt"
    torch.save(model.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    fresh = make_model(seed=4, double=False)
    idx = rand_idx(model.config, B=2)
    with torch.no_grad():
        before, _ = fresh(idx)
        fresh.load_state_dict(loaded, strict=True)
        expected, _ = model(idx)
        got, _ = fresh(idx)
    assert not torch.equal(before, expected)  # the fresh model really was different
    assert torch.equal(got, expected)
    assert fresh.head.weight is fresh.token_embedding.weight  # tying survives loading


# --------------------------------------------------------------------------
# 6. Backward
# --------------------------------------------------------------------------


@pytest.mark.parametrize("flags", VARIANTS)
def test_every_parameter_gets_a_finite_gradient(flags):
    model = make_model(double=False, **flags).train()
    idx = rand_idx(model.config, B=2)
    _, loss = model(idx, targets=rand_idx(model.config, B=2, seed=5))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("flags, k", [
    *[pytest.param(v.values[0], 3, id=v.id + "-k3") for v in VARIANTS],
    pytest.param(VARIANTS[0].values[0], 1, id="full-k1"), pytest.param(VARIANTS[0].values[0], 4, id="full-k4"),
])
def test_gradients_match_float64_reference(flags, k, impl):
    """Every parameter's gradient against autograd through the independent float64 reference
    (an independent check of the fast path's hand-written backward)."""
    model = make_model(CONV_KERNEL_SIZE=k, **flags)
    model.block_impl = impl
    cfg = model.config
    idx, targets = rand_idx(cfg, B=2), rand_idx(cfg, B=2, seed=2)
    _, loss = model(idx, targets=targets)
    loss.backward()
    leaves = {name: p.detach().clone().requires_grad_() for name, p in model.state_dict().items()}
    ref_cross_entropy(ref_forward(leaves, idx, cfg, keep_graph=True), targets).backward()
    named = dict(model.named_parameters())  # the tied head/embedding once, under token_embedding
    for name, leaf in leaves.items():
        if name == "head.weight":
            continue
        expected = leaf.grad + (leaves["head.weight"].grad if name == "token_embedding.weight" else 0)
        torch.testing.assert_close(named[name].grad, expected, atol=1e-10, rtol=1e-10, msg=name)


# --------------------------------------------------------------------------
# 6b. The fast block against the reference block
# --------------------------------------------------------------------------


def block_pair(flags: dict, k: int, C: int = 8, dtype=torch.float64, dropout: float = 0.2, seed: int = 0):
    """(fast, reference) GAMBlocks with the same random (non-init) weights."""
    from gam_model import GAMBlock

    cfg = small_config(N_EMBED=C, CONV_KERNEL_SIZE=k, DROPOUT=dropout, **flags)
    torch.manual_seed(seed)
    fast = GAMBlock(cfg).to(dtype)
    assert fast.impl == "fast"  # the default
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.3 * torch.randn_like(p))  # off the init: LayerNorm affine, biases matter
    ref = GAMBlock(cfg, impl="reference").to(dtype)
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


def run_block(block, x, w, seed=5):
    """Output, input gradient and parameter gradients of sum(block(x) * w); dropout seeded."""
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = block(x)
    (y * w).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("mode", [pytest.param("train", id="train"), pytest.param("eval", id="eval")])
@pytest.mark.parametrize("T", [1, 15, 63, 300])
@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("flags", VARIANTS)
def test_fast_block_matches_reference(flags, k, T, mode):
    """Outputs and every gradient, in float64, dropout included (the same draws: one seed)."""
    fast, ref = block_pair(flags, k)
    fast.train(mode == "train")
    ref.train(mode == "train")
    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, T, 8, generator=g, dtype=torch.float64)
    w = torch.randn(2, T, 8, generator=g, dtype=torch.float64)
    got, expected = run_block(fast, x, w), run_block(ref, x, w)
    names = ["out", "x.grad"] + [n for n, _ in fast.named_parameters()]
    assert len(got) == len(expected) == len(names)
    for name, a, b in zip(names, got, expected):
        assert b is not None and a is not None, name
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)
    if mode == "train":  # dropout really was on, and drew the same mask on both
        fast.eval()
        with torch.no_grad():
            assert not torch.allclose(fast(x), got[0])


@pytest.mark.parametrize("flags", VARIANTS[:4])
def test_fast_block_matches_reference_in_float32(flags):
    fast, ref = block_pair(flags, 3, C=64, dtype=torch.float32)
    x, w = torch.randn(3, 50, 64), torch.randn(3, 50, 64)
    for name, a, b in zip(["out", "x.grad"] + [n for n, _ in fast.named_parameters()],
                          run_block(fast.train(), x, w), run_block(ref.train(), x, w)):
        # Relative to the tensor's scale: a gradient summed over 150 positions carries the
        # rounding of its largest terms (seen: <= 3e-7 of the scale).
        assert (a - b).abs().max() <= 3e-6 * b.abs().max(), name


def test_fast_block_gradcheck():
    """Finite differences against the hand-written backward (float64, every input at once)."""
    for flags in (VARIANTS[0].values[0],):  # gate, convolution and memory: every branch of backward
        fast, _ = block_pair(flags, 3, C=4, dropout=0.0)
        names = [n for n, _ in fast.named_parameters()]
        x = torch.randn(2, 5, 4, dtype=torch.float64)

        def f(x, *params):
            return torch.func.functional_call(fast, dict(zip(names, params)), (x,))

        inputs = (x.requires_grad_(), *[p.detach().clone().requires_grad_() for p in fast.parameters()])
        assert torch.autograd.gradcheck(f, inputs, atol=1e-7, rtol=1e-5)


def saved_activation_bytes(block, x):
    """Bytes autograd keeps for backward (each storage once), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("flags, units", [
    pytest.param(VARIANTS[0].values[0], 9, id="full"),             # x, sig (2), read, x1, a (4)
    pytest.param(VARIANTS[1].values[0], 6, id="global_only"),      # x, x1, a (4)
    pytest.param(VARIANTS[2].values[0], 6, id="sum_fusion"),
    pytest.param(VARIANTS[3].values[0], 6, id="local_only"),
    pytest.param(VARIANTS[5].values[0], 7, id="gated_local_only"),  # + sig (1)
])
def test_fast_block_saves_less_for_backward(flags, units):
    """Exactly what the fast path keeps ((B, T, C) float units, the softmax weights (B, T, S)
    when there is a memory, the bool dropout mask), and at most 0.6x the reference; catches
    anything big saved by accident."""
    B, T, C = 2, 64, 32
    fast, ref = block_pair(flags, 3, C=C, dtype=torch.float32, dropout=0.1)
    x = torch.randn(B, T, C, requires_grad=True)
    got, reference = saved_activation_bytes(fast.train(), x), saved_activation_bytes(ref.train(), x)
    weights = 4 * B * T * SMALL["NUM_MEMORY_SLOTS"] if flags["USE_GLOBAL"] else 0
    assert got == (units * 4 + 1) * B * T * C + weights
    assert got <= 0.6 * reference, (got, reference)
    assert saved_activation_bytes(fast.eval(), x) == units * 4 * B * T * C + weights  # no mask in eval


def test_fast_block_under_autocast_follows_the_reference():
    """bf16 autocast on CPU: the same output and gradient dtypes as the reference, and both
    as close to the float32 result (bf16 keeps ~3 digits; seen: <= 1% of each tensor's scale)."""
    fast, ref = block_pair(VARIANTS[0].values[0], 3, C=32, dtype=torch.float32, dropout=0.0)
    x, w = torch.randn(2, 20, 32), torch.randn(2, 20, 32)
    exact = run_block(ref, x, w)
    outs = []
    for block in (fast, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(run_block(block, x, w))
    for i, (a, b, e) in enumerate(zip(*outs, exact)):
        assert a.dtype == b.dtype, i
        scale = e.abs().max()
        assert (a.float() - e).abs().max() <= 0.02 * scale, i
        assert (b.float() - e).abs().max() <= 0.02 * scale, i
    assert (outs[0][0] - exact[0]).abs().max() > 1e-4 * exact[0].abs().max()  # bf16 really was used
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [pytest.param(None, id="fp32"), pytest.param(torch.float16, id="fp16-autocast")])
def test_fast_block_matches_reference_on_cuda(autocast):
    """On CUDA (the paper's setting: fp16 autocast): same dtypes, values as close to the
    float32 result as the reference's, and less saved for backward."""
    fast, ref = block_pair(VARIANTS[0].values[0], 3, C=64, dtype=torch.float32, dropout=0.0)
    fast, ref = fast.cuda(), ref.cuda()
    x, w = torch.randn(2, 100, 64, device="cuda"), torch.randn(2, 100, 64, device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        exact = run_block(ref, x, w)
        outs = []
        for block in (fast, ref):
            with torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
                outs.append(run_block(block, x, w))
                saved = saved_activation_bytes(block, x.clone().requires_grad_())
            outs[-1].append(saved)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    tol = 2e-5 if autocast is None else 0.02
    for i, (a, b, e) in enumerate(zip(outs[0][:-1], outs[1][:-1], exact)):
        assert a.dtype == b.dtype, i
        scale = e.abs().max()
        assert (a.float() - e).abs().max() <= tol * scale, i
        assert (b.float() - e).abs().max() <= tol * scale, i
    assert outs[0][-1] <= 0.6 * outs[1][-1]


def test_block_impl_selection():
    from gam_model import BLOCK_IMPLS, GAMBlock

    assert BLOCK_IMPLS == ("fast", "reference")
    cfg = small_config()
    model = GAM_Model(cfg)
    assert model.block_impl == "fast" and all(b.impl == "fast" for b in model.blocks)
    ref = GAM_Model(cfg, block_impl="reference")
    assert all(b.impl == "reference" for b in ref.blocks)
    assert list(ref.state_dict()) == list(model.state_dict())  # the same state_dict either way
    assert "impl" not in json.dumps(cfg.to_dict())
    model.block_impl = "reference"
    assert model.block_impl == "reference"
    model.blocks[0].impl = "fast"
    assert model.block_impl == "mixed"
    with pytest.raises(ValueError, match="fast"):
        GAMBlock(cfg, impl="flash")
    with pytest.raises(ValueError, match="reference"):
        model.block_impl = "Fast"
    with pytest.raises(ValueError, match="fast"):
        GAM_Model(cfg, block_impl=None)


# --------------------------------------------------------------------------
# 7. generate
# --------------------------------------------------------------------------


def greedy_by_hand(model, idx, n):
    out = idx.clone()
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(out[:, -model.config.BLOCK_SIZE:])
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize(
    "t0, n",
    [pytest.param(4, 6, id="fits"), pytest.param(10, 20, id="crops_context"),
     pytest.param(16, 3, id="prompt_fills_block"), pytest.param(20, 3, id="prompt_longer_than_block")],
)
def test_generate_shape_prompt_and_greedy(t0, n):
    model = make_model(double=False)
    idx = rand_idx(model.config, B=2, T=t0)
    out = model.generate(idx, n, top_k=1)
    assert out.shape == (2, t0 + n)
    assert torch.equal(out[:, :t0], idx)
    assert torch.equal(out, greedy_by_hand(model, idx, n))
    sampled = model.generate(idx, n)
    assert sampled.shape == (2, t0 + n)
    assert torch.equal(sampled[:, :t0], idx)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < model.config.VOCAB_SIZE


def test_generate_zero_new_tokens_returns_prompt():
    model = make_model(double=False)
    idx = rand_idx(model.config, B=2, T=5)
    assert torch.equal(model.generate(idx, 0), idx)


def test_generate_seeding():
    model = make_model(double=False)
    idx = rand_idx(model.config, B=2, T=3)
    torch.manual_seed(0)
    a = model.generate(idx, 20)
    torch.manual_seed(0)
    b = model.generate(idx, 20)
    torch.manual_seed(1)
    c = model.generate(idx, 20)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_honours_generator():
    model = make_model(double=False)
    idx = rand_idx(model.config, B=2, T=3)
    torch.manual_seed(5)
    a = model.generate(idx, 20, generator=torch.Generator().manual_seed(42))
    torch.manual_seed(6)  # the global RNG must not matter when a generator is given
    b = model.generate(idx, 20, generator=torch.Generator().manual_seed(42))
    c = model.generate(idx, 20, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = torch.Generator().manual_seed(42)
    state = g.get_state()
    model.generate(idx, 2, generator=g)
    assert not torch.equal(g.get_state(), state)  # the generator was consumed


# --------------------------------------------------------------------------
# 8. Inputs: dtypes, empty inputs, nothing to score, check_inputs
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return make_model(double=False)


def _ids(*rows, dtype=torch.long):
    return torch.tensor(rows, dtype=dtype)


INTEGER_DTYPES = [pytest.param(d, id=str(d).removeprefix("torch."))
                  for d in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_ids_of_any_integer_dtype_give_the_long_result(tiny_model, dtype):
    # Catches: ids passed to nn.Embedding without .long() (it takes int32/int64 only).
    idx = rand_idx(tiny_model.config, B=2, T=6)
    with torch.no_grad():
        expected, _ = tiny_model(idx)
        got, _ = tiny_model(idx.to(dtype))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [p for p in INTEGER_DTYPES if p.values[0] != torch.int64])
def test_targets_of_any_integer_dtype_give_the_long_loss(tiny_model, dtype):
    # Catches: targets passed to cross_entropy without .long() ("expected ... Long").
    idx = rand_idx(tiny_model.config, B=2, T=6)
    targets = rand_idx(tiny_model.config, B=2, T=6, seed=7)
    if dtype.is_signed:
        targets[0, 1] = -100  # ignored positions survive the conversion
    with torch.no_grad():
        _, expected = tiny_model(idx, targets=targets)
        _, got = tiny_model(idx, targets=targets.to(dtype))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", [pytest.param((2, 0), id="T0"), pytest.param((0, 5), id="B0"),
                                   pytest.param((0, 0), id="B0_T0")])
def test_empty_input_without_targets_gives_empty_logits(tiny_model, shape):
    # Catches: T = 0 reaching the convolution ("kernel size can't be greater than input").
    with torch.no_grad():
        logits, loss = tiny_model(torch.zeros(shape, dtype=torch.long))
    assert logits.shape == (*shape, tiny_model.config.VOCAB_SIZE) and loss is None


@pytest.mark.parametrize(
    "idx, targets",
    [
        pytest.param(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), id="T0"),
        pytest.param(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long), id="empty_batch"),
        pytest.param(_ids([1, 2, 3]), _ids([-100, -100, -100]), id="all_ignored"),
        pytest.param(_ids([1, 2], [3, 4]), _ids([-100, -100], [-100, -100], dtype=torch.int32),
                     id="all_ignored_int32"),
    ],
)
def test_loss_with_nothing_to_score_is_an_error_not_nan(tiny_model, idx, targets):
    # Catches: the mean over zero positions silently returned as NaN (F.cross_entropy does).
    with pytest.raises(ValueError, match="nothing to score"):
        tiny_model(idx, targets=targets)


BAD_INPUTS = [
    pytest.param(torch.zeros(1, 17, dtype=torch.long), None, "BLOCK_SIZE", id="too_long"),
    pytest.param(_ids([1, -1, 2]), None, "VOCAB_SIZE", id="negative_id"),
    pytest.param(_ids([1, 50, 2]), None, "VOCAB_SIZE", id="id_equals_vocab"),
    pytest.param(_ids([1, 50, 2], dtype=torch.uint8), None, "VOCAB_SIZE", id="uint8_id_equals_vocab"),
    pytest.param(_ids([1, -3, 2], dtype=torch.int8), None, "VOCAB_SIZE", id="int8_negative_id"),
    pytest.param(torch.zeros(1, 4), None, "integer", id="float_idx"),
    pytest.param(torch.zeros(1, 4, dtype=torch.bool), None, "integer", id="bool_idx"),
    pytest.param([[1, 2]], None, "torch.Tensor", id="list_idx"),
    pytest.param(torch.zeros(4, dtype=torch.long), None, "shape", id="1d_idx"),
    pytest.param(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), "targets",
                 id="targets_wrong_shape"),
    pytest.param(torch.zeros(2, 4, dtype=torch.long), torch.zeros(8, dtype=torch.long), "targets", id="targets_flat"),
    pytest.param(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), "integer", id="float_targets"),
    pytest.param(torch.zeros(1, 3, dtype=torch.long), _ids([0, 50, 1]), "VOCAB_SIZE", id="target_equals_vocab"),
    pytest.param(torch.zeros(1, 3, dtype=torch.long), _ids([0, -2, 1]), "VOCAB_SIZE", id="target_negative"),
    pytest.param(torch.zeros(1, 3, dtype=torch.long), _ids([0, 50, 1], dtype=torch.int32), "VOCAB_SIZE",
                 id="int32_target_equals_vocab"),
]


@pytest.mark.parametrize("idx, targets, match", BAD_INPUTS)
def test_forward_rejects_bad_inputs(tiny_model, idx, targets, match):
    assert tiny_model.check_inputs is True  # the default
    with pytest.raises(ValueError, match=match):
        tiny_model(idx, targets=targets)


def test_check_inputs_off_gives_identical_results_and_skips_only_value_checks():
    model = make_model(double=False)
    other = make_model(double=False)
    assert model.check_inputs is True
    model.check_inputs = False
    assert other.check_inputs is True  # an instance attribute, not shared state
    assert "check_inputs" not in model.state_dict() and "check_inputs" not in model.config.to_dict()
    idx = rand_idx(model.config, B=2, T=9).to(torch.uint8)
    targets = rand_idx(model.config, B=2, T=9, seed=3).to(torch.int32)
    targets[1, 4] = -100
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(idx, targets), other(idx, targets)))
        # The value check really is skipped: a bad id now fails inside nn.Embedding instead.
        with pytest.raises(IndexError):
            model(_ids([1, 50, 2]))
        # Shape and type checks stay on: they cost no device sync.
        with pytest.raises(ValueError, match="BLOCK_SIZE"):
            model(torch.zeros(1, 17, dtype=torch.long))
        with pytest.raises(ValueError, match="integer"):
            model(torch.zeros(1, 4))


@pytest.mark.parametrize("with_targets", [pytest.param(False, id="no_targets"), pytest.param(True, id="targets")])
@pytest.mark.parametrize("check", [pytest.param(True, id="checked"), pytest.param(False, id="unchecked")])
def test_forward_reads_tensor_values_at_most_once(with_targets, check):
    """Every way Python can read a tensor's values (a device->host sync on a GPU) is
    counted: one read per checked forward, none when check_inputs is False."""
    model = make_model(double=False)
    model.check_inputs = check
    idx = rand_idx(model.config, B=2, T=8)
    targets = rand_idx(model.config, B=2, T=8, seed=4) if with_targets else None
    with torch.no_grad():
        reads = count_tensor_reads(lambda: model(idx, targets=targets))
    assert reads == (1 if check else 0), reads


# --------------------------------------------------------------------------
# 9. Configurations
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        pytest.param(dict(VOCAB_SIZE=0), "VOCAB_SIZE", id="vocab_0"),
        pytest.param(dict(VOCAB_SIZE=-5), "VOCAB_SIZE", id="vocab_negative"),
        pytest.param(dict(VOCAB_SIZE=100.0), "VOCAB_SIZE must be a positive integer", id="vocab_float"),
        pytest.param(dict(VOCAB_SIZE=True), "VOCAB_SIZE must be a positive integer", id="vocab_bool"),
        pytest.param(dict(VOCAB_SIZE="100"), "VOCAB_SIZE must be a positive integer", id="vocab_str"),
        pytest.param(dict(N_EMBED=0), "N_EMBED", id="embed_0"),
        pytest.param(dict(N_LAYER=0), "N_LAYER", id="layers_0"),
        pytest.param(dict(BLOCK_SIZE=0), "BLOCK_SIZE", id="block_0"),
        pytest.param(dict(NUM_MEMORY_SLOTS=0), "NUM_MEMORY_SLOTS", id="slots_0"),
        pytest.param(dict(CONV_KERNEL_SIZE=0), "CONV_KERNEL_SIZE", id="kernel_0"),
        pytest.param(dict(CONV_KERNEL_SIZE=np.int64(0)), "CONV_KERNEL_SIZE", id="kernel_numpy_0"),
        pytest.param(dict(DROPOUT=-0.1), "DROPOUT", id="dropout_negative"),
        pytest.param(dict(DROPOUT=1.0), "DROPOUT", id="dropout_1"),
        pytest.param(dict(DROPOUT=float("nan")), "DROPOUT", id="dropout_nan"),
        pytest.param(dict(DROPOUT="0.1"), "DROPOUT", id="dropout_str"),
        pytest.param(dict(DROPOUT=None), "DROPOUT", id="dropout_none"),
        pytest.param(dict(USE_GATE="no"), "USE_GATE must be True or False", id="gate_str_no"),
        pytest.param(dict(USE_LOCAL="False"), "USE_LOCAL must be True or False", id="local_str_False"),
        pytest.param(dict(USE_GLOBAL=1), "USE_GLOBAL must be True or False", id="global_int_1"),
        pytest.param(dict(USE_GATE=None), "USE_GATE must be True or False", id="gate_none"),
        pytest.param(dict(USE_LOCAL=np.bool_(True)), "USE_LOCAL must be True or False", id="local_numpy_bool"),
        pytest.param(dict(USE_LOCAL=False, USE_GLOBAL=False), "pathway", id="no_pathway_gated"),
        pytest.param(dict(USE_LOCAL=False, USE_GLOBAL=False, USE_GATE=False), "pathway", id="no_pathway_ungated"),
    ],
)
def test_invalid_config_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**SMALL, **overrides})


@pytest.mark.parametrize(
    "overrides, stored",
    [
        pytest.param(dict(VOCAB_SIZE=np.int64(100)), dict(VOCAB_SIZE=100), id="vocab_numpy_int64"),
        pytest.param(dict(N_LAYER=np.int32(3), BLOCK_SIZE=np.uint16(8)), dict(N_LAYER=3, BLOCK_SIZE=8),
                     id="numpy_int32_uint16"),
        pytest.param(dict(DROPOUT=0), dict(DROPOUT=0.0), id="dropout_int_0"),
        pytest.param(dict(DROPOUT=np.float32(0.5)), dict(DROPOUT=0.5), id="dropout_numpy_float32"),
    ],
)
def test_config_accepts_numpy_numbers_and_stores_plain_python(overrides, stored):
    # Catches: numpy ints refused, or kept as numpy (then json.dumps of the config fails).
    cfg = ModelConfig(**{**SMALL, **overrides})
    for name, value in stored.items():
        assert getattr(cfg, name) == value and type(getattr(cfg, name)) is type(value), name
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    assert GAM_Model(cfg).config.VOCAB_SIZE == cfg.VOCAB_SIZE


# --------------------------------------------------------------------------
# 10. generate: arguments and temperature
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(max_new_tokens=3, temperature=0.0), "temperature", id="temperature_0"),
        pytest.param(dict(max_new_tokens=3, temperature=-1.0), "temperature", id="temperature_negative"),
        pytest.param(dict(max_new_tokens=3, temperature=float("nan")), "temperature", id="temperature_nan"),
        pytest.param(dict(max_new_tokens=3, temperature=float("inf")), "temperature", id="temperature_inf"),
        pytest.param(dict(max_new_tokens=3, temperature="1.0"), "temperature must be a finite number",
                     id="temperature_str"),
        pytest.param(dict(max_new_tokens=3, temperature=None), "temperature must be a finite number",
                     id="temperature_none"),
        pytest.param(dict(max_new_tokens=3, temperature=True), "temperature", id="temperature_bool"),
        pytest.param(dict(max_new_tokens=-1), "max_new_tokens", id="negative_new_tokens"),
        pytest.param(dict(max_new_tokens=2.0), "max_new_tokens", id="float_new_tokens"),
        pytest.param(dict(max_new_tokens=3, top_k=0), "top_k", id="top_k_0"),
    ],
)
def test_generate_rejects_bad_arguments(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(torch.zeros(1, 2, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("temperature", [pytest.param(1e-45, id="1e-45"), pytest.param(1e-300, id="1e-300"),
                                         pytest.param(1e-30, id="1e-30")])
def test_generate_tiny_temperature_is_greedy(temperature):
    # Catches: logits / temperature before subtracting the row max (logits of a few units
    # over 1e-38 overflow to inf, and inf - inf = NaN in softmax), and a temperature that
    # rounds to 0 in float32 (1e-300: 0 / 0 = NaN).
    model = make_model(double=False)
    with torch.no_grad():
        model.ln_f.weight.mul_(300)  # logits of order 10-100, as a trained model has
    idx = rand_idx(model.config, B=3, T=4)
    with torch.no_grad():
        assert model(idx)[0].abs().max() > 10
    out = model.generate(idx, 8, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, greedy_by_hand(model, idx, 8))
    assert torch.equal(out, model.generate(idx, 8, top_k=1))


@pytest.mark.parametrize("temperature", [pytest.param(1, id="int_1"), pytest.param(np.float64(0.7), id="numpy_0.7")])
def test_generate_accepts_any_real_temperature(tiny_model, temperature):
    idx = rand_idx(tiny_model.config, B=2, T=3)
    a = tiny_model.generate(idx, 5, temperature=temperature, generator=torch.Generator().manual_seed(1))
    b = tiny_model.generate(idx, 5, temperature=float(temperature), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_generate_checks_ids_before_the_cropped_window(tiny_model):
    prompt = torch.zeros(1, 40, dtype=torch.long)  # longer than BLOCK_SIZE=16: cropped when fed
    prompt[0, 0] = 50                              # invalid id outside the last 16 tokens
    with pytest.raises(ValueError, match="VOCAB_SIZE"):
        tiny_model.generate(prompt, max_new_tokens=1)


def test_ignored_targets_are_accepted(tiny_model):
    idx = torch.zeros(1, 4, dtype=torch.long)
    targets = torch.tensor([[1, -100, 2, -100]])
    with torch.no_grad():
        _, loss = tiny_model(idx, targets=targets)
        logits, _ = tiny_model(idx)
    expected = ref_cross_entropy(logits[0, [0, 2]].double(), torch.tensor([1, 2]))  # the scored two only
    assert abs(loss.item() - expected.item()) < 1e-5


# --------------------------------------------------------------------------
# 11. The usage example of the paper's repository
# --------------------------------------------------------------------------


def test_readme_usage_snippet_runs_as_written(capsys):
    """The README's first python block (the paper's usage example) runs verbatim."""
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "GAM_Model(config)" in snippet and "ModelConfig(" in snippet
    torch.manual_seed(0)
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "Model initialized with 22,599,680 parameters." in out
    assert "Output logits shape: torch.Size([8, 128, 10000])" in out
    # An untrained model is close to uniform over the 10,000 tokens: loss ~ ln(10000).
    loss = float(out.split("Calculated loss: ", 1)[1].split()[0])
    assert abs(loss - math.log(10000)) < 1.5
