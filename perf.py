"""Performance checks of the GAM block and of generation, in one process (numbers in assets/perf-cpu/):

    python perf.py --checks block generate --profile --threads 1 --out-dir assets/perf-cpu

1. block: one GAM block in train mode (default B=4, T=2048, C=512, fp32), written as the
   author's code (``author_style_forward``), our reference path and the fast path, all with
   the same weights: the bytes autograd saves for backward (exact, via
   ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded) and
   the forward + backward time, as the median of runs interleaved across the three.
2. generate: tokens/s of greedy ``generate`` on paper-size models (ModelConfig defaults,
   untrained), 1-token prompt, --new-tokens tokens, streaming (``use_cache=True``) vs
   re-encoding the context per token (``use_cache=False``, what the paper's model does), at
   each --batch-sizes; the two must give the same tokens.
3. mamba-layer, mamba-step: TorchMamba's two selective scans (``scan="chunked"`` and mambapy's
   ``"pscan"``, the same weights), by default at the paper's size (B=32, T=256, ModelConfig
   defaults): one mixer in train mode, forward + backward (mamba-layer), and a whole training
   step, forward, backward and AdamW, of MambaLM against GAM_Model, as ``build_lm`` builds them
   (mamba-step); each with the bytes saved for backward (as above) and the median time of runs
   interleaved across the variants. ``--mamba-scans chunked`` leaves out the slow pscan: at the
   paper's size it saves 2 GiB a layer (a 6-layer step ~13 GiB) and takes minutes a step, so on a
   small machine time its step at ``--mamba-batch 8`` (3.1 GiB).

``--profile`` adds, to the block check, one forward + backward of the author-style and the fast
block under torch.profiler: the ops with the most self CPU time of each go to profile.md.

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

from baselines import MAMBA_SCANS, MODEL_NAMES, TorchMamba, build_lm, build_mamba_mixer
from gam_model import GAMBlock, ModelConfig
from common import MIB, OneLineParser, atomic_write_text, int_at_least, run_metadata

CHECKS = ("block", "generate", "mamba-layer", "mamba-step")


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


def interleaved_medians(fns: dict, reps: int) -> dict:
    """Each of fns (name -> callable) run reps + 1 times, round-robin so that the machine's load
    changes reach all alike, the first round a warm-up: name -> {"median", "all"} (seconds)."""
    times = {n: [] for n in fns}
    for _ in range(reps + 1):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    return {n: {"median": statistics.median(ts[1:]), "all": ts[1:]} for n, ts in times.items()}


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

    def forward_backward(n):
        block.zero_grad(set_to_none=True)
        x.grad = None
        run(n).sum().backward()

    times = interleaved_medians({n: lambda n=n: forward_backward(n) for n in variants}, args.reps)
    out = {"B": args.batch, "T": args.seq_len, "C": args.d_model, "dtype": "float32",
           "saved_MiB": {n: b / MIB for n, b in saved.items()}, "max_abs_diff_fast_vs_author": diff,
           "time_s": times, "ratio_vs_author": ratios(saved, times, "author")}
    if args.profile:
        out["profile"] = {n: profile_ops(lambda n=n: forward_backward(n), args.profile_rows) for n in PROFILED}
    return out


PROFILED = ("author", "fast")  # the blocks --profile profiles


def profile_ops(fn, rows: int) -> dict:
    """fn() once under torch.profiler (CPU ops, after one warm-up call): the total self CPU time
    and the ``rows`` ops (aten names) with the most self CPU time, with their call counts."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"self_cpu_total_ms": sum(e.self_cpu_time_total for e in ops) / 1e3,
            "top": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in ops[:rows]]}


def profile_markdown(b: dict) -> str:
    """The --profile table: the union of each profiled block's top ops, one row an op, both blocks' columns."""
    prof = b["profile"]
    rows = {r["op"]: {} for n in prof for r in prof[n]["top"]}
    for n in prof:
        for r in prof[n]["top"]:
            rows[r["op"]][n] = r
    order = sorted(rows, key=lambda op: -max(r["self_cpu_ms"] for r in rows[op].values()))
    head = " | ".join(f"{n} calls | {n} self CPU (ms)" for n in prof)
    lines = [f"GAM block, train mode, B={b['B']} T={b['T']} C={b['C']} fp32, one forward + backward under "
             "torch.profiler (CPU, after a warm-up): the ops with the most self CPU time in either block "
             "(blank: not among that block's top rows).", "", f"| Op | {head} |", "|---" * (1 + 2 * len(prof)) + "|"]
    for op in order:
        cells = [f"{rows[op][n]['calls']} | {rows[op][n]['self_cpu_ms']:.1f}" if n in rows[op] else " | " for n in prof]
        lines.append(f"| {op} | {' | '.join(cells)} |")
    total = " | ".join(f" | {prof[n]['self_cpu_total_ms']:.1f}" for n in prof)
    lines.append(f"| total (all ops) | {total} |")
    return "\n".join(lines) + "\n"


def ratios(saved: dict, times: dict, base: str) -> dict:
    """name -> {"saved", "time_median"}, each variant's over ``base``'s."""
    return {n: {"saved": saved[n] / saved[base], "time_median": times[n]["median"] / times[base]["median"]}
            for n in times}


def set_scan(model: torch.nn.Module, scan: str) -> None:
    """Every TorchMamba in model to ``scan``: the same weights and function through the other scan."""
    for m in model.modules():
        if isinstance(m, TorchMamba):
            m.scan = scan


def mamba_layer_check(args) -> dict:
    """One TorchMamba (MambaLM's d_state 16, d_conv 4, expand 3), train mode, forward + backward."""
    torch.manual_seed(args.seed)
    mixer, _ = build_mamba_mixer(args.mamba_d_model, d_state=16, d_conv=4, expand=3, impl="torch")
    mixer.train()
    x = torch.randn(args.mamba_batch, args.mamba_seq_len, args.mamba_d_model, requires_grad=True)

    def run(scan):
        set_scan(mixer, scan)
        return mixer(x)

    def forward_backward(scan):
        mixer.zero_grad(set_to_none=True)
        x.grad = None
        run(scan).sum().backward()

    scans = args.mamba_scans
    saved = {s: saved_bytes(lambda _, s=s: run(s), x, mixer.parameters()) for s in scans}
    with torch.no_grad():
        outs = [run(s) for s in scans]
    times = interleaved_medians({s: lambda s=s: forward_backward(s) for s in scans}, args.mamba_reps)
    both = len(scans) == 2
    return {"B": args.mamba_batch, "T": args.mamba_seq_len, "C": args.mamba_d_model, "d_inner": mixer.d_inner,
            "d_state": mixer.d_state, "dtype": "float32", "saved_MiB": {s: b / MIB for s, b in saved.items()},
            "max_abs_diff_chunked_vs_pscan": (outs[0] - outs[1]).abs().max().item() if both else None,
            "time_s": times, **({"ratio_vs_pscan": ratios(saved, times, "pscan")} if both else {})}


def mamba_step_check(args) -> dict:
    """A training step (forward, loss, backward, AdamW) of MambaLM, one per scan, and of GAM_Model."""
    T = args.mamba_seq_len
    cfg = ModelConfig(N_EMBED=args.mamba_d_model, N_LAYER=args.mamba_layers,
                      BLOCK_SIZE=max(T, ModelConfig().BLOCK_SIZE))
    torch.manual_seed(args.seed)
    models = {"gam": build_lm("gam", cfg).train(), "mamba": build_lm("mamba", cfg, mamba_impl="torch").train()}
    optims = {n: torch.optim.AdamW(m.parameters()) for n, m in models.items()}
    idx = torch.randint(0, cfg.VOCAB_SIZE, (args.mamba_batch, T))
    variants = {"gam": ("gam", None), **{f"mamba-{s}": ("mamba", s) for s in args.mamba_scans}}

    def loss(name):
        family, scan = variants[name]
        if scan:
            set_scan(models[family], scan)
        return models[family](idx, targets=idx)[1]

    def train_step(name):
        opt = optims[variants[name][0]]
        opt.zero_grad(set_to_none=True)
        loss(name).backward()
        opt.step()

    saved = {n: saved_bytes(lambda _, n=n: loss(n), idx, models[variants[n][0]].parameters()) for n in variants}
    times = interleaved_medians({n: lambda n=n: train_step(n) for n in variants}, args.mamba_reps)
    out = {"B": args.mamba_batch, "T": T, "C": cfg.N_EMBED, "n_layer": cfg.N_LAYER, "dtype": "float32",
           "params": {f: m.num_params() for f, m in models.items()},
           "saved_MiB": {n: b / MIB for n, b in saved.items()}, "time_s": times,
           "ratio_vs_gam": ratios(saved, times, "gam")}
    if len(args.mamba_scans) == 2:
        out["ratio_vs_mamba_pscan"] = ratios(saved, times, "mamba-pscan")
    return out


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
    lines += mamba_markdown(doc)
    m = doc["metadata"]
    lines += ["", f"{m.get('device_name', 'cpu')}, {doc['threads']} thread(s), torch {m.get('torch_version')}, "
                  f"load average {doc['loadavg_start']} -> {doc['loadavg_end']}."]
    return "\n".join(lines) + "\n"


def mamba_markdown(doc) -> list[str]:
    lines = []
    for key, title, base in (("mamba_layer", "TorchMamba layer, train mode, forward + backward", "pscan"),
                             ("mamba_step", "Training step (forward, backward, AdamW)", "gam")):
        if key not in doc:
            continue
        r = doc[key]
        rel = r.get(f"ratio_vs_{base}") or {}
        size = f"B={r['B']} T={r['T']} C={r['C']}" + (f", {r['n_layer']} layers" if "n_layer" in r else
                                                          f", d_inner {r['d_inner']}, d_state {r['d_state']}")
        lines += [f"{title}, {size}, fp32:", "",
                  f"| Variant | Saved for backward (MiB) | x {base} | Time, median (s) | x {base} |",
                  "|---|---|---|---|---|"]
        for n, t in r["time_s"].items():
            x = {k: f"{v:.3f}" for k, v in rel.get(n, {}).items()}  # empty without the base variant
            lines.append(f"| {n} | {r['saved_MiB'][n]:.1f} | {x.get('saved', '')} | {t['median']:.3f} | "
                         f"{x.get('time_median', '')} |")
        lines.append("")
    return lines


def parse_args(argv=None):
    p = OneLineParser(prog="perf.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS), help="what to measure")
    p.add_argument("--batch", type=int_at_least(1), default=4, help="block check: batch")
    p.add_argument("--seq-len", type=int_at_least(1), default=2048, help="block check: sequence length")
    p.add_argument("--d-model", type=int_at_least(1), default=512, help="block check: width")
    p.add_argument("--reps", type=int_at_least(1), default=9, help="block check: timed rounds (after one warm-up)")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=["gam"], help="generate check: families")
    p.add_argument("--batch-sizes", nargs="+", type=int_at_least(1), default=[1, 8], help="generate check")
    p.add_argument("--new-tokens", type=int_at_least(1), default=255, help="generate check: new tokens")
    p.add_argument("--mamba-batch", type=int_at_least(1), default=32, help="mamba checks: batch")
    p.add_argument("--mamba-seq-len", type=int_at_least(1), default=256, help="mamba checks: sequence length")
    p.add_argument("--mamba-d-model", type=int_at_least(1), default=ModelConfig().N_EMBED, help="mamba checks: width")
    p.add_argument("--mamba-layers", type=int_at_least(1), default=ModelConfig().N_LAYER,
                   help="mamba checks: layers of the two LMs of the training step")
    p.add_argument("--mamba-scans", nargs="+", choices=MAMBA_SCANS, default=list(MAMBA_SCANS),
                   help="mamba checks: TorchMamba's scans to compare")
    p.add_argument("--mamba-reps", type=int_at_least(1), default=3,
                   help="mamba checks: timed rounds (after one warm-up)")
    p.add_argument("--profile", action="store_true",
                   help="block check: also profile one forward + backward of the author-style and fast blocks "
                        "with torch.profiler; their top ops go to profile.md (and perf.json)")
    p.add_argument("--profile-rows", type=int_at_least(1), default=12, help="--profile: top ops per block")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs")
    p.add_argument("--out-dir", required=True, help="where perf.json and perf.md go")
    args = p.parse_args(argv)
    if args.profile and "block" not in args.checks:
        p.error("--profile profiles the block check: add block to --checks")
    return args


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
    args.mamba_scans = [s for s in MAMBA_SCANS if s in args.mamba_scans]  # chunked first, each once
    if "mamba-layer" in args.checks:
        doc["mamba_layer"] = mamba_layer_check(args)
    if "mamba-step" in args.checks:
        doc["mamba_step"] = mamba_step_check(args)
    doc.update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - start, metadata=run_metadata("cpu"))
    atomic_write_text(os.path.join(args.out_dir, "perf.json"), json.dumps(doc, indent=1) + "\n")
    atomic_write_text(os.path.join(args.out_dir, "perf.md"), markdown(doc))
    if "profile" in doc.get("block", {}):
        atomic_write_text(os.path.join(args.out_dir, "profile.md"), profile_markdown(doc["block"]))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
