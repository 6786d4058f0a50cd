"""Greedy decoding speed through Hugging Face transformers against the repository's generate.

    python hf_speed.py            # smoke-preset sizes, 1 thread; prints a Markdown table

For each family: a model of the smoke preset's size (C=64, 2 layers, BLOCK_SIZE 128, vocab 1000),
saved with save_pretrained and opened with AutoModelForCausalLM; a 16-token prompt, 112 new tokens
(to BLOCK_SIZE), batch 1. tokens/s of transformers' generate with its cache (the repository's
decoding state, hf_model.DecodingState) and without (re-encoding), and of the repository's own
generate both ways. The best of three repeats (the machine may be shared).
"""

import os
import sys
import tempfile
import time

import torch

from baselines import FAMILIES
from gam_model import ModelConfig
from pretrained import save_pretrained

CONFIG = dict(VOCAB_SIZE=1000, BLOCK_SIZE=128, N_EMBED=64, N_LAYER=2, NUM_MEMORY_SLOTS=64)
FAMILY_ARGS = {"gam": {}, "transformer": dict(n_head=4), "mamba": dict(d_state=8, expand=2, impl="torch")}
PROMPT, NEW, REPEATS = 16, 112, 3


def best_tokens_per_s(generate) -> float:
    """New tokens per second of the fastest of REPEATS calls (after one warm-up call)."""
    generate()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    return NEW / min(times)


def measure(family: str, folder: str) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = FAMILIES[family](ModelConfig(**CONFIG), **FAMILY_ARGS[family]).eval()
    save_pretrained(model, folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    prompt = torch.randint(0, CONFIG["VOCAB_SIZE"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
    row = {}
    for use_cache in (True, False):
        row[f"hf cache={use_cache}"] = best_tokens_per_s(lambda: hf.generate(
            prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=use_cache))
        model.use_cache = use_cache
        row[f"repo use_cache={use_cache}"] = best_tokens_per_s(lambda: model.generate(prompt, NEW, top_k=1))
    return row


def main() -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        rows = {family: measure(family, os.path.join(tmp, family)) for family in FAMILIES}
    columns = list(next(iter(rows.values())))
    print(f"tokens/s, greedy, batch 1, prompt {PROMPT}, {NEW} new tokens, {torch.get_num_threads()} thread(s)\n")
    print("| family | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for family, row in rows.items():
        print(f"| {family} | " + " | ".join(f"{row[c]:,.0f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
