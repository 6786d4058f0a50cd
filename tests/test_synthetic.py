"""MQAR generator and recall accuracy (synthetic.py): structure against naive recomputation,
seeding, split independence, the gap law, the receptive-field split, argument checks."""

import random

import pytest
import torch

from synthetic import mqar, mqar_gap_probs, mqar_splits, recall_accuracy

CONFIGS = [  # (vocab_size, seq_len, num_kv_pairs)
    (1024, 64, 8),
    (1024, 64, 4),
    (20, 16, 4),     # tight: 9 keys in 1..9, values 10..19, space = 4 offsets for 4 queries
    (10, 4, 1),
    (8192, 128, 16),
]


def naive_check(inputs, targets, distances, V, T, P):
    """Every rule of the task, one example at a time, with plain Python."""
    for x, y, d in zip(inputs.tolist(), targets.tolist(), distances.tolist()):
        assert len(x) == len(y) == len(d) == T
        assert all(0 <= t < V for t in x)
        keys, values = x[0:2 * P:2], x[1:2 * P:2]
        assert len(set(keys)) == P and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == P and all(V // 2 <= v < V for v in values)
        pair = dict(zip(keys, values))
        query_positions = [q for q in range(T) if y[q] != -100]
        assert len(query_positions) == P
        assert sorted(x[q] for q in query_positions) == sorted(keys)  # each key queried once
        for q in range(T):
            if q in query_positions:
                assert q >= 2 * P and (q - 2 * P) % 2 == 0
                assert y[q] == pair[x[q]]
                key_pos = next(j for j in range(0, 2 * P, 2) if x[j] == x[q])
                assert d[q] == q - key_pos
                assert x[q - d[q] + 1] == y[q]  # the value sits right after the key
            else:
                assert y[q] == -100 and d[q] == -1


@pytest.mark.parametrize("V,T,P", CONFIGS)
def test_structure_matches_naive_recomputation(V, T, P):
    data = mqar(150, vocab_size=V, seq_len=T, num_kv_pairs=P, seed=3)
    assert set(data) == {"inputs", "targets", "distances"}
    for t in data.values():
        assert t.dtype == torch.long and t.shape == (150, T)
    naive_check(data["inputs"], data["targets"], data["distances"], V, T, P)


def test_fill_is_random_over_the_whole_vocabulary():
    V, T, P = 64, 64, 4
    data = mqar(500, vocab_size=V, seq_len=T, num_kv_pairs=P, seed=0)
    fill = data["inputs"][:, 2 * P:][data["targets"][:, 2 * P:] == -100]
    counts = torch.bincount(fill, minlength=V).double()
    assert counts.numel() == V and counts.min() > 0  # both halves and 0 appear
    expected = fill.numel() / V
    assert ((counts - expected) ** 2 / expected).sum() < 2 * V  # chi-square, V-1 dof


def test_key_order_and_choice_are_uniform():
    # keys from 1..4 (V=10), two pairs: 12 ordered pairs, each 1/12
    data = mqar(6000, vocab_size=10, seq_len=8, num_kv_pairs=2, seed=1)
    k = data["inputs"][:, [0, 2]]
    codes = torch.bincount((k[:, 0] - 1) * 4 + (k[:, 1] - 1), minlength=16).double()
    observed = codes[codes > 0]
    assert observed.numel() == 12
    expected = 6000 / 12
    assert ((observed - expected) ** 2 / expected).sum() < 40  # chi-square, 11 dof (p ~ 1e-5)


def test_deterministic_per_seed_and_split():
    kw = dict(vocab_size=1024, seq_len=64, num_kv_pairs=8)
    a, b = mqar(64, seed=7, **kw), mqar(64, seed=7, **kw)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["inputs"], mqar(64, seed=8, **kw)["inputs"])
    assert not torch.equal(a["inputs"], mqar(64, seed=7, split="validation", **kw)["inputs"])


def test_train_and_validation_are_independent_streams():
    kw = dict(vocab_size=1024, seq_len=64, num_kv_pairs=4, seed=0)
    small, large = mqar_splits(100, 300, **kw), mqar_splits(2000, 300, **kw)
    assert torch.equal(small["validation"]["inputs"], large["validation"]["inputs"])
    train = {tuple(r) for r in large["train"]["inputs"].tolist()}
    assert not any(tuple(r) in train for r in large["validation"]["inputs"].tolist())
    # no shared kv sections either (the part that defines the answers)
    train_kv = {tuple(r) for r in large["train"]["inputs"][:, :8].tolist()}
    assert not any(tuple(r) in train_kv for r in large["validation"]["inputs"][:, :8].tolist())


def test_gap_law_matches_successive_weighted_draws():
    """Distances against an independent reference: numpy-style successive draws without
    replacement (key 1 from the whole law, key 2 from what remains, ...), in plain Python."""
    V, T, P, N = 1024, 32, 4, 4000
    space = (T - 2 * P) // 2
    p = mqar_gap_probs(space).tolist()
    rng = random.Random(0)
    ref = [0] * (T + 1)
    for _ in range(N):
        left = list(range(space))
        for i in range(P):
            g = rng.choices(left, weights=[p[j] for j in left])[0]
            left.remove(g)
            ref[2 * P + 2 * g - 2 * i] += 1
    d = mqar(N, vocab_size=V, seq_len=T, num_kv_pairs=P, seed=0)["distances"]
    ours = torch.bincount(d[d > 0], minlength=T + 1).tolist()
    tv = 0.5 * sum(abs(a - b) for a, b in zip(ours, ref)) / (N * P)
    assert tv < 0.03, tv


def test_gaps_are_skewed_to_short_and_power_a_one_is_uniform():
    V, T, P, N = 1024, 128, 4, 4000
    space = (T - 2 * P) // 2  # 60
    for power_a, check in ((0.01, "skewed"), (1.0, "uniform")):
        data = mqar(N, vocab_size=V, seq_len=T, num_kv_pairs=P, seed=2, power_a=power_a)
        # the first key (position 0) is drawn first: its gap follows the law exactly
        q0 = (data["inputs"][:, 2 * P:] == data["inputs"][:, :1]) & (data["targets"][:, 2 * P:] != -100)
        first_gap = q0.float().argmax(dim=1) // 2
        freq = torch.bincount(first_gap, minlength=space).double() / N
        if check == "skewed":
            p = mqar_gap_probs(space, power_a)
            assert abs(freq[0] - p[0]) < 0.03 and p[0] > 0.2      # ~ 1/H(60) = 0.21
            assert freq[:5].sum() > 0.45                          # 5 of 60 gaps hold half the mass
            assert first_gap.double().mean() < 0.6 * (space - 1) / 2
        else:
            assert (freq - 1 / space).abs().max() < 0.02
            assert abs(first_gap.double().mean() - (space - 1) / 2) < 1.5


def window_oracle(inputs, R, P):
    """Predicts a query's value iff its key AND value lie in positions q-R+1..q; else 0
    (never a value). The reference for what a model with receptive field R can answer."""
    N, T = inputs.shape
    pred = torch.zeros_like(inputs)
    for n in range(N):
        x = inputs[n].tolist()
        for q in range(2 * P, T):
            for j in range(max(0, q - R + 1), min(2 * P, q)):
                if j % 2 == 0 and x[j] == x[q] and j + 1 <= q:
                    pred[n, q] = x[j + 1]
    return pred


@pytest.mark.parametrize("R", [1, 2, 3, 5, 8, 13])
def test_within_rf_is_exactly_what_a_window_of_r_tokens_can_answer(R):
    P = 4
    data = mqar(300, vocab_size=1024, seq_len=32, num_kv_pairs=P, seed=4)
    pred = window_oracle(data["inputs"], R, P)
    out = recall_accuracy(pred, data["targets"], data["distances"], receptive_field=R)
    assert out["recall_count_within_rf"] + out["recall_count_beyond_rf"] == out["recall_count"] == 300 * P
    if out["recall_count_within_rf"]:
        assert out["recall_accuracy_within_rf"] == 1.0
    assert out["recall_accuracy_beyond_rf"] == 0.0
    if R >= 5:
        assert out["recall_count_within_rf"] > 0


def test_recall_accuracy_hand_made():
    I = -100
    targets = torch.tensor([[I, I, 7, I, 9, I],
                            [I, I, I, 5, I, 6]])
    distances = torch.tensor([[-1, -1, 2, -1, 6, -1],
                              [-1, -1, -1, 3, -1, 4]])
    preds = torch.tensor([[0, 0, 7, 0, 1, 0],    # right (d=2), wrong (d=6)
                          [0, 0, 0, 5, 0, 6]])   # right (d=3), right (d=4)
    out = recall_accuracy(preds, targets, distances, receptive_field=4)  # within: d <= 3
    assert out["recall_accuracy"] == 0.75 and out["recall_count"] == 4 and out["recall_correct"] == 3
    assert (out["recall_count_within_rf"], out["recall_correct_within_rf"]) == (2, 2)
    assert out["recall_accuracy_within_rf"] == 1.0
    assert (out["recall_count_beyond_rf"], out["recall_correct_beyond_rf"]) == (2, 1)
    assert out["recall_accuracy_beyond_rf"] == 0.5
    assert out["receptive_field"] == 4
    # R = 5: d = 4 moves within
    out5 = recall_accuracy(preds, targets, distances, receptive_field=5)
    assert (out5["recall_count_within_rf"], out5["recall_count_beyond_rf"]) == (3, 1)
    # no receptive field: overall only; a prediction of -100 at ignored positions is not "correct"
    plain = recall_accuracy(torch.full_like(targets, -100), targets, distances)
    assert plain == {"recall_accuracy": 0.0, "recall_correct": 0, "recall_count": 4}
    # empty group -> None
    out1 = recall_accuracy(preds, targets, distances, receptive_field=1)
    assert out1["recall_accuracy_within_rf"] is None and out1["recall_count_within_rf"] == 0


def test_loss_through_the_lm_frame_is_on_query_answers_only():
    from torch.nn import functional as F

    from gam_model import GAM_Model, ModelConfig

    data = mqar(4, vocab_size=64, seq_len=16, num_kv_pairs=2, seed=0)
    torch.manual_seed(0)
    model = GAM_Model(ModelConfig(VOCAB_SIZE=64, BLOCK_SIZE=16, N_EMBED=16, N_LAYER=1,
                                  NUM_MEMORY_SLOTS=8, DROPOUT=0.0)).eval()
    logits, loss = model(data["inputs"], data["targets"])
    q = data["targets"] != -100
    assert torch.allclose(loss, F.cross_entropy(logits[q], data["targets"][q]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_examples=0), "num_examples"),
    (dict(num_examples=2.0), "num_examples"),
    (dict(vocab_size=True), "vocab_size"),
    (dict(vocab_size=17, num_kv_pairs=8), "too small"),   # keys 1..7: 7 < 8
    (dict(vocab_size=9, num_kv_pairs=4, seq_len=16), "too small"),  # keys 1..3
    (dict(seq_len=63), "even"),
    (dict(seq_len=30, num_kv_pairs=8), "too short"),
    (dict(num_kv_pairs=0), "num_kv_pairs"),
    (dict(power_a=0.0), "power_a"),
    (dict(power_a=float("inf")), "power_a"),
    (dict(power_a=float("nan")), "power_a"),
    (dict(seed=1.5), "seed"),
    (dict(split="val"), "split"),
])
def test_bad_arguments(kwargs, match):
    args = dict(num_examples=4, vocab_size=1024, seq_len=64, num_kv_pairs=8, seed=0)
    args.update(kwargs)
    n = args.pop("num_examples")
    with pytest.raises(ValueError, match=match):
        mqar(n, **args)


def test_smallest_valid_arguments_work():
    mqar(1, vocab_size=18, seq_len=32, num_kv_pairs=8)   # exactly 8 keys, seq_len = 4P
    mqar(1, vocab_size=1024, seq_len=64, num_kv_pairs=16)


def test_recall_accuracy_bad_arguments():
    t = torch.full((2, 4), -100)
    t[0, 2] = 5
    d = torch.full((2, 4), -1)
    d[0, 2] = 2
    with pytest.raises(ValueError, match="shape"):
        recall_accuracy(t[:, :3], t, d)
    with pytest.raises(ValueError, match="integer"):
        recall_accuracy(t.float(), t, d)
    with pytest.raises(ValueError, match="receptive_field"):
        recall_accuracy(t, t, d, receptive_field=0)
    with pytest.raises(ValueError, match="distance"):
        recall_accuracy(t, t, torch.full((2, 4), -1))
