"""Performance checks of the GAM block and of generation, in one process (numbers in assets/perf-cpu/):

    python perf.py --out-dir assets/perf-cpu --threads 1

1. block: one GAM block in train mode (default B=4, T=2048, C=512, fp32), written as the
   author's code (``author_style_forward``), our reference path and the fast path, all with
   the same weights: the bytes autograd saves for backward (exact, via
   ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded) and
   the forward + backward time, as the median of runs interleaved across the three.
2. generate: tokens/s of greedy ``generate`` on paper-size models (ModelConfig defaults,
   untrained), 1-token prompt, --new-tokens tokens, streaming (``use_cache=True``) vs
   re-encoding the context per token (``use_cache=False``, what the paper's model does), at
   each --batch-sizes; the two must give the same tokens.

A separate script rather than a scale.py mode: these are fixed-size comparisons of
implementations, not sweeps over lengths, so scale.py's per-length rows, fits and plots do not
fit them. Writes perf.json and perf.md to --out-dir.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from baselines import MODEL_NAMES, build_lm
from gam_model import GAMBlock, ModelConfig
from common import MIB, OneLineParser, atomic_write_text, int_at_least, run_metadata

def author_style_forward(block: GAMBlock, x: torch.Tensor) -> torch.Tensor:
    """A GAM block as the author's code writes it (the paper's equations), on ``block``'s weights:
    the convolution padded on both sides and cut to T, the gate's two halves by chunk."""
    T, k = x.shape[1], block.kernel_size
    h = block.ln1(x)                                                          # (B, T, C)
    local = F.conv1d(h.transpose(1, 2), block.causal_conv.weight, block.causal_conv.bias,
                     padding=k - 1, groups=h.shape[2])[..., :T].transpose(1, 2)  # (B, T, C)
    weights = F.softmax(h @ block.memory_bank.T, dim=-1)                      # (B, T, S)
    glob = weights @ block.memory_bank                                        # (B, T, C)
    g_local, g_global = block.gate(h).chunk(2, dim=-1)                        # 2 x (B, T, C)
    x = x + torch.sigmoid(g_local) * local + torch.sigmoid(g_global) * glob
    return x + block.ffn(block.ln2(x))                                        # (B, T, C)


def saved_bytes(fn, x: torch.Tensor, params) -> int:
    """Bytes autograd keeps for the backward of fn(x), each storage once, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    del out
    return sum(n for ptr, n in seen.items() if ptr not in skip)


def block_check(args) -> dict:
    torch.manual_seed(args.seed)
    cfg = ModelConfig(N_EMBED=args.d_model)
    block = GAMBlock(cfg).train()
    x = torch.randn(args.batch, args.seq_len, args.d_model, requires_grad=True)

    def run(name):
        block.impl = "reference" if name == "reference" else "fast"
        torch.manual_seed(args.seed)  # the same dropout mask for each
        return author_style_forward(block, x) if name == "author" else block(x)

    variants = ("author", "reference", "fast")
    saved = {n: saved_bytes(lambda _, n=n: run(n), x, block.parameters()) for n in variants}
    diff = (run("fast") - run("author")).abs().max().item()
    times = {n: [] for n in variants}
    for _ in range(args.reps + 1):  # the first round is warm-up
        for n in variants:
            block.zero_grad(set_to_none=True)
            x.grad = None
            t0 = time.perf_counter()
            run(n).sum().backward()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(ts[1:]) for n, ts in times.items()}
    return {"B": args.batch, "T": args.seq_len, "C": args.d_model, "dtype": "float32",
            "saved_MiB": {n: b / MIB for n, b in saved.items()}, "max_abs_diff_fast_vs_author": diff,
            "time_s": {n: {"median": med[n], "all": ts[1:]} for n, ts in times.items()},
            "ratio_vs_author": {n: {"saved": saved[n] / saved["author"], "time_median": med[n] / med["author"]}
                                for n in variants}}


@torch.no_grad()
def generate_check(args) -> dict:
    out = {}
    for family in args.models:
        torch.manual_seed(args.seed)
        model = build_lm(family, ModelConfig()).eval()
        for B in args.batch_sizes:
            prompt = torch.randint(0, model.config.VOCAB_SIZE, (B, 1))
            res, tokens = {}, {}
            for mode, cache in (("reencode", False), ("stream", True)):
                model.use_cache = cache
                t0 = time.perf_counter()
                tokens[mode] = model.generate(prompt, args.new_tokens, temperature=1e-45)  # greedy
                s = time.perf_counter() - t0
                res[mode] = {"seconds": s, "tokens_per_s": B * args.new_tokens / s}
            res["speedup"] = res["stream"]["tokens_per_s"] / res["reencode"]["tokens_per_s"]
            res["identical_tokens"] = bool(torch.equal(tokens["reencode"], tokens["stream"]))
            out[f"{family} B={B}"] = res
            print(f"{family} B={B}: {res['speedup']:.1f}x", flush=True)
    return out


def markdown(doc) -> str:
    lines = []
    if "block" in doc:
        b = doc["block"]
        lines += [f"GAM block, train mode, B={b['B']} T={b['T']} C={b['C']} fp32, forward + backward:", "",
                  "| Block | Saved for backward (MiB) | x author | Time, median (s) | x author |", "|---|---|---|---|---|"]
        for n in ("author", "reference", "fast"):
            r = b["ratio_vs_author"][n]
            lines.append(f"| {n} | {b['saved_MiB'][n]:.1f} | {r['saved']:.2f} | {b['time_s'][n]['median']:.3f} | "
                         f"{r['time_median']:.2f} |")
        lines.append("")
    if "generate" in doc:
        lines += [f"Greedy generate, paper-size models (untrained), 1-token prompt, {doc['args']['new_tokens']} "
                  "new tokens:", "", "| Model, batch | Re-encoding tok/s | Streaming tok/s | Speed-up | Same tokens |",
                  "|---|---|---|---|---|"]
        for k, r in doc["generate"].items():
            lines.append(f"| {k} | {r['reencode']['tokens_per_s']:.1f} | {r['stream']['tokens_per_s']:.1f} | "
                         f"{r['speedup']:.1f}x | {r['identical_tokens']} |")
    m = doc["metadata"]
    lines += ["", f"{m.get('device_name', 'cpu')}, {doc['threads']} thread(s), torch {m.get('torch_version')}, "
                  f"load average {doc['loadavg_start']} -> {doc['loadavg_end']}."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = OneLineParser(prog="perf.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checks", nargs="+", choices=["block", "generate"], default=["block", "generate"],
                   help="what to measure")
    p.add_argument("--batch", type=int_at_least(1), default=4, help="block check: batch")
    p.add_argument("--seq-len", type=int_at_least(1), default=2048, help="block check: sequence length")
    p.add_argument("--d-model", type=int_at_least(1), default=512, help="block check: width")
    p.add_argument("--reps", type=int_at_least(1), default=9, help="block check: timed rounds (after one warm-up)")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=["gam"], help="generate check: families")
    p.add_argument("--batch-sizes", nargs="+", type=int_at_least(1), default=[1, 8], help="generate check")
    p.add_argument("--new-tokens", type=int_at_least(1), default=255, help="generate check: new tokens")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs")
    p.add_argument("--out-dir", required=True, help="where perf.json and perf.md go")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    doc = {"args": vars(args), "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    start = time.perf_counter()
    if "block" in args.checks:
        doc["block"] = block_check(args)
    if "generate" in args.checks:
        doc["generate"] = generate_check(args)
    doc.update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - start, metadata=run_metadata("cpu"))
    atomic_write_text(os.path.join(args.out_dir, "perf.json"), json.dumps(doc, indent=1) + "\n")
    atomic_write_text(os.path.join(args.out_dir, "perf.md"), markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
