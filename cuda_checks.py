"""The CUDA checks that the CPU test suite cannot make, each one pass/fail line with its numbers.

    python cuda_checks.py --out-dir runs/checks              # on a CUDA GPU, at the paper's sizes
    python cuda_checks.py --device cpu --tiny --out-dir X    # no CUDA: every check recorded as skipped

- fast-vs-reference-fp16, -bf16: GAMBlock's fast path (its hand-written backward) against its
  reference path (the equations as modules) under CUDA autocast: the output, the input gradient
  and every parameter gradient of each, compared with the float32 result (TF32 off).
- one-sync-per-forward: the device-to-host syncs of one GAM_Model forward (train mode, with
  targets), counted with torch.cuda.set_sync_debug_mode: 1 with the input checks on (their one
  .tolist()), 0 with ``model.check_inputs = False`` (as benchmark.py trains).
- torchmamba-vs-mamba_ssm: baselines.TorchMamba against mamba_ssm.Mamba with the same weights,
  output and gradients (skipped, with the reason, where mamba_ssm does not import).
- export-to-cuda: each family saved by pretrained.save_pretrained, loaded by from_pretrained
  onto the GPU, gives the logits it gives on the CPU.

Each check is a function of (device, size) returning its record (status, numbers, tolerance,
note), so that the test suite runs them on CPU where their logic allows. Writes
cuda_checks.json and cuda_checks.md into --out-dir (a new or empty folder), after every check.
Exit codes: 0 no check failed (skipped ones aside), 1 a check failed, 2 bad input, 130 / 143
interrupted (Ctrl-C / SIGTERM), with the checks done so far written.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from baselines import FAMILIES, Mamba, build_lm, build_mamba_mixer
from common import (OneLineParser, StopSignals, UsageError, atomic_write_json, atomic_write_text, autocast_context,
                    claim_empty_folder, interrupt_exit_code, one_line, run_metadata)
from gam_model import GAM_Model, GAMBlock, ModelConfig

# The paper's model (batch 8 of its 256-token blocks), and a size at which the CPU tests run.
SIZES = {"paper": dict(batch=8, seq_len=256, n_embed=512, n_layer=6, slots=512, vocab=10000),
         "tiny": dict(batch=2, seq_len=16, n_embed=32, n_layer=2, slots=16, vocab=64)}
# |error| / max |exact| allowed for any tensor under autocast: fp16 / bf16 keep 3-4 significant
# digits and a block is a few roundings deep (the CPU suite sees <= 1% in bf16).
AUTOCAST_TOL = 0.02
# Below this, autocast did not lower the precision at all: the check would compare nothing.
LOWERED_MIN = 1e-5
# Same weights, float32, TF32 off: CPU vs GPU and TorchMamba vs mamba_ssm differ by rounding
# order only (mamba_ssm's fused scan reorders most: the CUDA suite allows 1e-3 there).
EXPORT_TOL, EXPORT_TOL_MAMBA_SSM = 1e-4, 1e-3
MAMBA_TOL = {"output": 1e-3, "input grad": 1e-3, "parameter grads": 1e-2}
SYNC_DEBUG_MESSAGE = "synchroniz"  # torch's warning: "called a synchronizing CUDA operation"
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


def record(status: str, numbers: dict | None = None, tolerance: str = "", note: str = "") -> dict:
    return {"status": status, "numbers": numbers or {}, "tolerance": tolerance, "note": note}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (float64, on the host): the worst error as a fraction of b's scale."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@contextlib.contextmanager
def exact_fp32():
    """TF32 off (cuDNN's convolutions use it by default): float32 references at float32 precision."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def model_config(size: dict, **overrides) -> ModelConfig:
    return ModelConfig(VOCAB_SIZE=size["vocab"], BLOCK_SIZE=size["seq_len"], N_EMBED=size["n_embed"],
                       N_LAYER=size["n_layer"], NUM_MEMORY_SLOTS=size["slots"], **overrides)


def random_like_input(size: dict, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size["batch"], size["seq_len"], size["n_embed"], generator=g).to(device)


def random_ids(size: dict, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1), generator=g)


def module_grads(module: torch.nn.Module, x: torch.Tensor, w: torch.Tensor, dtype: str) -> dict:
    """Output, input gradient and parameter gradients of sum(module(x) * w); the forward under
    autocast in ``dtype``, the backward outside it, as benchmark.py trains."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with autocast_context(dtype, x.device):
        y = module(x)
    (y.float() * w).sum().backward()
    return {"output": y.detach(), "input grad": x.grad, **{f"grad {n}": p.grad for n, p in module.named_parameters()}}


# ---------------------------------------------------------------------------------------
# The checks: each f(device, size) -> record(...)


def gam_block_pair(size: dict, device) -> tuple[GAMBlock, GAMBlock]:
    """(fast, reference) GAMBlocks with the same weights, moved off the init (so that the
    layer norms' affine parameters and the biases matter), dropout off (no random draws)."""
    cfg = model_config(size, DROPOUT=0.0)
    torch.manual_seed(0)
    fast = GAMBlock(cfg, impl="fast")
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref = GAMBlock(cfg, impl="reference")
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast.to(device), ref.to(device)


def fast_vs_reference(device, size: dict, dtype: str) -> dict:
    """Both paths under autocast in ``dtype``, each compared with the float32 reference."""
    fast, ref = gam_block_pair(size, device)
    x, w = random_like_input(size, device, 1), random_like_input(size, device, 2)
    with exact_fp32():
        exact = module_grads(ref, x, w, "fp32")
        got = {"fast": module_grads(fast, x, w, dtype), "reference": module_grads(ref, x, w, dtype)}
    err = {impl: {k: rel_err(v, exact[k]) for k, v in g.items()} for impl, g in got.items()}
    worst = max(err["fast"], key=err["fast"].get)
    numbers = {"fast_max_rel_err": err["fast"][worst], "fast_worst_tensor": worst,
               "reference_max_rel_err": max(err["reference"].values()),
               "fast_vs_reference_max_rel_diff": max(rel_err(got["fast"][k], got["reference"][k]) for k in exact),
               "tensors_compared": len(exact)}
    same_dtypes = all(got["fast"][k].dtype == got["reference"][k].dtype for k in exact)
    lowered = err["fast"]["output"] > LOWERED_MIN
    # As accurate as the reference path: bf16 alone may take both past a fixed bound at large sizes.
    within = all(err["fast"][k] <= max(AUTOCAST_TOL, 2 * err["reference"][k]) for k in exact)
    notes = [*(["the two paths give different dtypes"] if not same_dtypes else []),
             *([f"autocast changed nothing (output error <= {LOWERED_MIN:g})"] if not lowered else [])]
    tolerance = (f"every tensor of the fast path within max({AUTOCAST_TOL:g}, 2 x the reference path's error) x its "
                 "max |value| of the float32 result; the same dtypes on both paths")
    return record("pass" if same_dtypes and lowered and within else "fail", numbers, tolerance, "; ".join(notes))


def count_tensor_reads(fn) -> int:
    """Calls of the tensor methods that copy a value to the host (each a sync on a GPU): the
    CPU's stand-in for the sync debug mode, as the CPU suite counts them."""
    reads, originals = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(original):
        def method(self, *a, **k):
            reads.append(original.__name__)
            return original(self, *a, **k)
        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return len(reads)


def count_host_syncs(fn, device) -> int:
    """Device-to-host syncs during fn(): CUDA's sync debug mode warns at each one."""
    if torch.device(device).type != "cuda":
        return count_tensor_reads(fn)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # every sync, not the first one per line of code
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(SYNC_DEBUG_MESSAGE in str(w.message) for w in seen)


def one_sync_per_forward(device, size: dict) -> dict:
    torch.manual_seed(0)
    model = GAM_Model(model_config(size)).to(device).train()
    ids = random_ids(size).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    counts = {}
    for checked in (True, False):
        model.check_inputs = checked
        model(x, y)  # untimed: a first call's one-off set-up (cuBLAS handles, ...) is not the forward's
        counts["input checks on" if checked else "input checks off"] = count_host_syncs(lambda: model(x, y), device)
    how = ("torch.cuda.set_sync_debug_mode('warn')" if torch.device(device).type == "cuda"
           else "tensor-to-host reads (no sync debug mode on CPU)")
    ok = counts == {"input checks on": 1, "input checks off": 0}
    return record("pass" if ok else "fail", {**counts, "counted_by": how},
                  "exactly 1 sync with the input checks on (their one .tolist()), 0 with them off")


def mamba_ssm_missing() -> str | None:
    """Why mamba_ssm cannot be used here, or None (baselines imports it once, quietly)."""
    if Mamba is not None:
        return None
    try:
        import mamba_ssm  # noqa: F401  (imported for its error message only)
    except Exception as e:
        return f"{type(e).__name__}: {one_line(e)}"
    return "it imports, but not its Mamba class"


def torchmamba_vs_mamba_ssm(device, size: dict) -> dict:
    if torch.device(device).type != "cuda":
        return record("skipped", note="mamba_ssm runs on CUDA only")
    why = mamba_ssm_missing()
    if why:
        return record("skipped", note=f"mamba_ssm does not import ({why})")
    torch.manual_seed(7)
    official, _ = build_mamba_mixer(size["n_embed"], impl="mamba_ssm", device=device)
    ours, _ = build_mamba_mixer(size["n_embed"], impl="torch", device=device)
    ours.load_state_dict(official.state_dict(), strict=True)
    x, w = random_like_input(size, device, 1), random_like_input(size, device, 2)
    with exact_fp32():
        a, b = module_grads(official, x, w, "fp32"), module_grads(ours, x, w, "fp32")
    err = {k: rel_err(b[k], a[k]) for k in a}
    numbers = {"output": err.pop("output"), "input grad": err.pop("input grad"),
               "parameter grads": max(err.values())}
    ok = all(numbers[k] <= tol for k, tol in MAMBA_TOL.items())
    return record("pass" if ok else "fail", numbers, "max |difference| / max |mamba_ssm's| within "
                  + ", ".join(f"{k} {tol:g}" for k, tol in MAMBA_TOL.items()) + " (float32, TF32 off)")


def export_to_device(device, size: dict) -> dict:
    """Every family saved on the CPU, loaded onto ``device``: its logits against the CPU's."""
    from pretrained import from_pretrained, save_pretrained

    ids, numbers, ok = random_ids(size)[:, :-1], {}, True
    with tempfile.TemporaryDirectory() as tmp, exact_fp32(), torch.no_grad():
        for family in FAMILIES:
            torch.manual_seed(0)
            save_pretrained(build_lm(family, model_config(size), mamba_impl="torch"), Path(tmp, family))
            cpu_logits = from_pretrained(Path(tmp, family))(ids)[0]
            loaded = from_pretrained(Path(tmp, family), device=device)
            numbers[family] = rel_err(loaded(ids.to(device))[0], cpu_logits)
            numbers[f"{family} implementation"] = loaded.implementation
            ok &= numbers[family] <= (EXPORT_TOL_MAMBA_SSM if loaded.implementation == "mamba_ssm" else EXPORT_TOL)
    return record("pass" if ok else "fail", numbers, f"max |difference| / max |CPU logit| within {EXPORT_TOL:g} "
                  f"({EXPORT_TOL_MAMBA_SSM:g} for mamba_ssm's kernels), float32, TF32 off")


CHECKS = {
    "fast-vs-reference-fp16": functools.partial(fast_vs_reference, dtype="fp16"),
    "fast-vs-reference-bf16": functools.partial(fast_vs_reference, dtype="bf16"),
    "one-sync-per-forward": one_sync_per_forward,
    "torchmamba-vs-mamba_ssm": torchmamba_vs_mamba_ssm,
    "export-to-cuda": export_to_device,
}


# ---------------------------------------------------------------------------------------
# Running them: one record per check, written as soon as it exists.


def run_check(name: str, device, size: dict) -> dict:
    """One check; an exception is its failure, in one line (the others still run)."""
    start = time.perf_counter()
    if torch.device(device).type != "cuda":
        rec = record("skipped", note=f"no CUDA device (this run is on {device})")
    elif name.endswith("bf16") and not torch.cuda.is_bf16_supported():
        rec = record("skipped", note="this GPU does not support bfloat16")
    else:
        try:
            rec = CHECKS[name](device, size)
        except Exception as e:  # a bug or an out-of-memory: this check failed, say how
            rec = record("fail", note=f"raised {type(e).__name__}: {one_line(e)}")
    return {"name": name, **rec, "seconds": round(time.perf_counter() - start, 3)}


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"CUDA checks on {meta['device_name']} ({meta['device']}), size {meta['size_name']} "
             f"{meta['size']}, torch {meta['torch_version']}, commit {meta['git_commit']}", "",
             "| Check | Status | Numbers | Tolerance | Note |", "|---|---|---|---|---|"]
    for r in records:
        numbers = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["numbers"].items())
        cells = [r["name"], f"**{r['status']}**", numbers, r["tolerance"], r["note"]]
        lines.append("| " + " | ".join(c or "-" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write(out_dir: Path, records: list[dict], meta: dict) -> None:
    atomic_write_json(out_dir / "cuda_checks.json", {**meta, "checks": records})
    atomic_write_text(out_dir / "cuda_checks.md", markdown(records, meta))


def run_all(out_dir: Path, device: torch.device, size_name: str) -> list[dict]:
    meta = {**run_metadata(device), "size_name": size_name, "size": SIZES[size_name]}
    records = []
    for name in CHECKS:
        records.append(run_check(name, device, SIZES[size_name]))
        print(f"cuda_checks: {name}: {records[-1]['status']} {records[-1]['note']}".rstrip(), flush=True)
        write(out_dir, records, meta)
    return records


def parse_args(argv=None):
    p = OneLineParser(prog="cuda_checks.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu (every check "
                                                    "then recorded as skipped: they are CUDA's)")
    p.add_argument("--tiny", action="store_true", help=f"tiny sizes {SIZES['tiny']} instead of the paper's "
                                                       f"{SIZES['paper']}")
    p.add_argument("--out-dir", required=True, help="a new or empty folder for cuda_checks.json and cuda_checks.md")
    args = p.parse_args(argv)
    try:
        args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                                   "cpu" if args.device == "auto" else args.device)
    except RuntimeError as e:
        p.error(f"--device: {one_line(e)}")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: only cpu and cuda are supported")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with StopSignals().installed() as stop:
        try:
            lock = claim_empty_folder(Path(args.out_dir), "--out-dir", "cuda_checks.py")
        except (OSError, UsageError) as e:
            print(f"cuda_checks.py: error: {e}", file=sys.stderr)
            return 2
        try:
            records = run_all(Path(args.out_dir), args.device, "tiny" if args.tiny else "paper")
        except KeyboardInterrupt as e:
            stop.disarm()
            print(f"cuda_checks.py: stopped; the checks done so far are in {args.out_dir}", file=sys.stderr)
            return interrupt_exit_code(e)
        finally:
            lock.release()
    print((Path(args.out_dir) / "cuda_checks.md").read_text())
    return 1 if any(r["status"] == "fail" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
