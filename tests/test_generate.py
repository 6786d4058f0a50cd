"""Streaming generation (``use_cache=True``, the default) against re-encoding (``use_cache=False``).

The reference semantics of ``generate`` is the re-encoding loop: for every new token, the
last logits of ``forward`` on the context cropped to its last BLOCK_SIZE tokens. Streaming
(GAM: the last k-1 normalised inputs per layer; Transformer: a KV cache; Mamba: its conv and
SSM states; past BLOCK_SIZE: re-encoding only what the last logits depend on) must give the
same logits at every step, hence the same tokens, greedy or sampled with one generator.

Tiny float64 models with BLOCK_SIZE 16, so every test crosses BLOCK_SIZE in a few steps.
"""

from __future__ import annotations

import pytest
import torch

import baselines
import gam_model
from baselines import TorchMamba, build_block, build_lm, build_mamba_mixer
from gam_model import GAM_Model, ModelConfig

BLOCK = 16


def config(**overrides) -> ModelConfig:
    kw = dict(VOCAB_SIZE=40, BLOCK_SIZE=BLOCK, N_EMBED=16, N_LAYER=2, NUM_MEMORY_SLOTS=8)
    return ModelConfig(**{**kw, **overrides})


MODELS = [
    pytest.param("gam", {}, {}, id="gam"),
    pytest.param("gam", {"USE_GATE": False, "USE_LOCAL": False}, {}, id="gam-global_only"),
    pytest.param("gam", {"USE_GATE": False, "USE_GLOBAL": False}, {}, id="gam-local_only"),
    pytest.param("gam", {"CONV_KERNEL_SIZE": 1}, {}, id="gam-k1"),
    pytest.param("gam", {"CONV_KERNEL_SIZE": 4, "N_LAYER": 3}, {}, id="gam-k4-L3"),  # RF 10 of 16
    pytest.param("gam", {"CONV_KERNEL_SIZE": 4, "N_LAYER": 6}, {}, id="gam-rf19-over-block"),
    pytest.param("transformer", {}, {"attention": "naive", "n_head": 4}, id="transformer-naive"),
    pytest.param("transformer", {}, {"attention": "sdpa", "n_head": 2}, id="transformer-sdpa"),
    pytest.param("transformer", {"N_LAYER": 3}, {"n_head": 2, "conv_layers": 1}, id="transformer-conv1"),
    pytest.param("transformer", {}, {"n_head": 1, "conv_layers": 1, "ffn": False, "embedding_std": 0.02},
                 id="conv-attention-control"),
    pytest.param("mamba", {}, {"mamba_impl": "torch"}, id="mamba"),
    pytest.param("mamba", {}, {"mamba_impl": "torch", "mamba_residual": True}, id="mamba-residual"),
]


def make(name, flags, kwargs, seed=0):
    torch.manual_seed(seed)
    model = build_lm(name, config(**flags), **kwargs).double().eval()
    with torch.no_grad():  # off the init, so that every pathway and position matters
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        model.ln_f.weight.mul_(3)  # logits of a few units: the sampled tests are not near-uniform
    return model


def generate_recording(model, monkeypatch, idx, n, use_cache, **kwargs):
    """generate with ``use_cache``; returns (tokens, the (B, V) logits of every step, how many
    steps went through ``stream`` (the decoding states) and how many re-encoded a full window)."""
    seen, calls = [], {"stream": 0, "full_window": 0}
    real_sample, real_stream, real_logits = gam_model._sample, model.stream, model.logits

    def recording(logits, *args):
        seen.append(logits.clone())
        return real_sample(logits, *args)

    def stream(*args):
        calls["stream"] += 1
        return real_stream(*args)

    def logits(*args):
        calls["full_window"] += 1
        return real_logits(*args)

    monkeypatch.setattr(gam_model, "_sample", recording)
    monkeypatch.setattr(model, "stream", stream)  # instance attributes shadow the methods
    monkeypatch.setattr(model, "logits", logits)
    model.use_cache = use_cache
    try:
        out = model.generate(idx, n, **kwargs)
    finally:
        model.use_cache = True
        monkeypatch.undo()
    return out, seen, calls


PROMPTS = [pytest.param(1, 1, id="B1-prompt1"), pytest.param(3, 5, id="B3-prompt5"),
           pytest.param(3, 20, id="B3-prompt-longer-than-block")]
# Every family and GAM variant with a batch of 3; the main ones at batch 1 and with a long prompt too.
GREEDY_CASES = [pytest.param(*m.values, *p.values, id=f"{m.id}-{p.id}") for m in MODELS for p in PROMPTS
                if p.id == "B3-prompt5" or m.id in ("gam", "gam-rf19-over-block", "transformer-naive",
                                                     "transformer-sdpa", "transformer-conv1",
                                                     "conv-attention-control", "mamba", "mamba-residual")]


@pytest.mark.parametrize("name, flags, kwargs, B, prompt", GREEDY_CASES)
def test_streaming_equals_reencoding_greedy(name, flags, kwargs, B, prompt, monkeypatch):
    """Same logits at every step (to float64 rounding) and the same tokens, crossing BLOCK_SIZE."""
    model = make(name, flags, kwargs)
    idx = torch.randint(0, 40, (B, prompt), generator=torch.Generator().manual_seed(B + prompt))
    n = BLOCK - prompt + 8 if prompt < BLOCK else 6  # 7 or 6 tokens past BLOCK_SIZE
    ref, ref_logits, ref_calls = generate_recording(model, monkeypatch, idx, n, use_cache=False, top_k=1)
    got, got_logits, calls = generate_recording(model, monkeypatch, idx, n, use_cache=True, top_k=1)
    assert ref.shape == (B, prompt + n) and ref.shape[1] > BLOCK + 2
    assert ref_calls == {"stream": 0, "full_window": n}
    # Streaming really streams: every step up to BLOCK_SIZE through the decoding states.
    assert calls == {"stream": max(BLOCK - prompt + 1, 0), "full_window": 0}
    assert torch.equal(got, ref)
    assert len(got_logits) == len(ref_logits) == n
    for step, (a, b) in enumerate(zip(got_logits, ref_logits)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"step {step}")
    # Not vacuous: the logits change from step to step (new tokens, new positions).
    assert min((a - ref_logits[0]).abs().max() for a in ref_logits[1:]) > 1e-3


@pytest.mark.parametrize("name, flags, kwargs", [MODELS[0], MODELS[6], MODELS[8], MODELS[9], MODELS[10]])
def test_streaming_equals_reencoding_sampled(name, flags, kwargs):
    """Temperature sampling with one generator seed: the same tokens on both paths."""
    model = make(name, flags, kwargs)
    idx = torch.randint(0, 40, (3, 2), generator=torch.Generator().manual_seed(0))
    outs = []
    for use_cache in (False, True):
        model.use_cache = use_cache
        outs.append(model.generate(idx, 30, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(outs[0], outs[1])
    greedy = model.generate(idx, 30, top_k=1)
    assert not torch.equal(outs[1], greedy)  # really sampled


def test_gam_streams_and_reencodes_only_the_receptive_field(monkeypatch):
    """Before BLOCK_SIZE: the prompt once, then one token per step through block.step; no
    block.forward. Past it: block.forward on the last receptive_field tokens only."""
    model = make("gam", {"CONV_KERNEL_SIZE": 3, "N_LAYER": 2}, {})
    rf = model.receptive_field
    assert rf == 5
    forward_lengths, step_lengths = [], []
    block = type(model.blocks[0])
    real_forward, real_step = block.forward, block.step

    def forward(self, x):
        forward_lengths.append(x.shape[1])
        return real_forward(self, x)

    def step(self, x, cache):
        step_lengths.append(x.shape[1])
        return real_step(self, x, cache)

    monkeypatch.setattr(block, "forward", forward)
    monkeypatch.setattr(block, "step", step)
    model.generate(torch.zeros(2, 4, dtype=torch.long), BLOCK, top_k=1)
    # Per block: the prompt (4 tokens) at length 4, one token at each length 5..16 = BLOCK_SIZE,
    # then at lengths 17, 18, 19 (cropped windows) the last rf tokens.
    assert step_lengths == [4] * 2 + [1] * 2 * (BLOCK - 4)
    assert forward_lengths == [rf] * 2 * 3
    monkeypatch.undo()


def test_use_cache_is_a_plain_attribute():
    model = make("gam", {}, {})
    other = make("gam", {}, {})
    assert model.use_cache is True
    model.use_cache = False
    assert other.use_cache is True
    assert "use_cache" not in model.state_dict() and "use_cache" not in model.config.to_dict()


# ----------------------------------------------------------------------------------------
# The decoding state of each block against its forward
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_gam_block_step_equals_forward(k, chunk):
    """Positions fed in chunks through block.step (carrying the last k-1 normalised inputs)."""
    torch.manual_seed(0)
    block = gam_model.GAMBlock(config(CONV_KERNEL_SIZE=k)).double().eval()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
        outs, cache = [], None
        for t in range(0, 30, chunk):
            out, cache = block.step(x[:, t:t + chunk], cache)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, atol=1e-12, rtol=1e-12)
    if k > 1:
        torch.testing.assert_close(cache, block.ln1(x[:, -(k - 1):]))


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
@pytest.mark.parametrize("chunks", [pytest.param([1] * 9, id="one-by-one"), pytest.param([5, 1, 3], id="mixed"),
                                    pytest.param([40, 1, 50, 9], id="grows-past-capacity")])
def test_transformer_block_step_equals_forward(attention, chunks):
    """The KV cache with several new positions at once (causal among them) and its growth."""
    torch.manual_seed(0)
    block, _ = build_block("transformer-sdpa" if attention == "sdpa" else "transformer", d_model=16, n_head=4)
    block = block.double().eval()
    T = sum(chunks)
    x = torch.randn(2, T, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
        outs, cache, t = [], None, 0
        for c in chunks:
            out, cache = block.step(x[:, t:t + c], cache)
            outs.append(out)
            t += c
    assert cache[2] == T and cache[0].shape[2] >= T
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("scan", ["chunked", pytest.param("pscan", marks=pytest.mark.skipif(
    baselines.pscan is None, reason="needs mambapy"))])
@pytest.mark.parametrize("T", [1, 3, 40])
def test_torch_mamba_step_equals_forward(T, scan):
    """mamba_ssm's step API on TorchMamba: one token at a time equals forward's scan (float64)."""
    torch.manual_seed(0)
    mixer, _ = build_mamba_mixer(16, d_state=4, d_conv=4, expand=2, impl="torch")
    assert isinstance(mixer, TorchMamba)
    mixer.scan = scan
    mixer = mixer.double().eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
        mixer.dt_proj.bias.add_(1.0)  # dt of order 1: the state really moves
    x = torch.randn(2, T, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = mixer(x)
        conv_state, ssm_state = mixer.allocate_inference_cache(2, T)
        assert conv_state.shape == (2, 32, 4) and ssm_state.shape == (2, 32, 4)
        outs = []
        for t in range(T):
            out, conv_state2, ssm_state2 = mixer.step(x[:, t:t + 1], conv_state, ssm_state)
            assert conv_state2 is conv_state and ssm_state2 is ssm_state  # updated in place
            outs.append(out)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, atol=1e-10, rtol=1e-10)


def test_float32_streaming_tokens_match_at_paper_width():
    """float32, C=512 (the paper's width; 2 layers, small vocab): greedy tokens still identical."""
    torch.manual_seed(0)
    model = GAM_Model(ModelConfig(VOCAB_SIZE=100, BLOCK_SIZE=BLOCK, N_LAYER=2, NUM_MEMORY_SLOTS=64)).eval()
    idx = torch.randint(0, 100, (2, 3))
    streamed = model.generate(idx, 25, top_k=1)
    model.use_cache = False
    assert torch.equal(streamed, model.generate(idx, 25, top_k=1))


def test_generate_refuses_what_it_cannot_do_before_decoding():
    """A generator that is not one, and an output that cannot be allocated (10**12 tokens), are
    ValueErrors naming the fix, raised before any token is decoded; 0 new tokens is the prompt."""
    model = make("gam", {}, {})
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="generator must be None or a torch.Generator"):
        model.generate(idx, 2, generator="seed")
    with pytest.raises(ValueError, match="output ids alone need .* GiB.*generate fewer tokens"):
        model.generate(idx, 10**12)
    assert torch.equal(model.generate(idx, 0), idx)


@pytest.mark.parametrize("bad", [None, {"N_EMBED": 16}, "ModelConfig()"])
def test_a_model_needs_a_model_config(bad):
    for build in (GAM_Model, lambda c: build_lm("transformer", c), lambda c: build_lm("mamba", c, mamba_impl="torch")):
        with pytest.raises(ValueError, match=r"config must be a ModelConfig \(for a dict d: ModelConfig\(\*\*d\)\)"):
            build(bad)
