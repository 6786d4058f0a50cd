"""MQAR learning curves: fresh examples every step (throwaway driver; imports the models from a fixed snapshot)."""
import argparse, json, math, sys, time
sys.path.insert(0, "/work/recall/snap")
import torch, torch.nn as nn
from gam_model import ModelConfig
from baselines import build_lm
from benchmark import lr_lambda
from synthetic import mqar, recall_accuracy

p = argparse.ArgumentParser()
p.add_argument("--model", default="transformer"); p.add_argument("--lr", type=float, default=1e-2)
p.add_argument("--batch", type=int, default=64); p.add_argument("--steps", type=int, default=2000)
p.add_argument("--warmup", type=int, default=100); p.add_argument("--heads", type=int, default=4)
p.add_argument("--d", type=int, default=64); p.add_argument("--layers", type=int, default=2)
p.add_argument("--no-ffn", action="store_true"); p.add_argument("--pos-small", action="store_true"); p.add_argument("--small-init", action="store_true")
p.add_argument("--kv", type=int, default=4); p.add_argument("--T", type=int, default=64)
p.add_argument("--vocab", type=int, default=1024); p.add_argument("--seed", type=int, default=1)
p.add_argument("--eval-every", type=int, default=250); p.add_argument("--pool", type=int, default=0,
               help="0: fresh examples every step; N: a fixed pool of N examples reshuffled")
p.add_argument("--wd", type=float, default=0.1); p.add_argument("--conv0", action="store_true",
               help="layer 0's attention replaced by a causal depthwise conv (k=3), as Zoology's MQAR baselines"); p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(a.seed)
cfg = ModelConfig(VOCAB_SIZE=a.vocab, BLOCK_SIZE=a.T, N_EMBED=a.d, N_LAYER=a.layers, DROPOUT=0.0,
                  NUM_MEMORY_SLOTS=64, CONV_KERNEL_SIZE=3)
model = build_lm(a.model, cfg, n_head=a.heads, d_state=8, d_conv=4, expand=2, mamba_impl="torch")
class CausalConv(nn.Module):
    def __init__(self, C, k=3):
        super().__init__(); self.k = k; self.conv = nn.Conv1d(C, C, k, groups=C, padding=k - 1)
    def forward(self, x):                                   # (B, T, C)
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
if a.conv0:
    model.blocks[0].attn = CausalConv(a.d)
if a.no_ffn:
    for b in model.blocks:
        b.ffn = nn.Identity()
if a.pos_small:
    nn.init.normal_(model.pos_embedding.weight, std=0.02)
if a.small_init:
    for n_, prm in model.named_parameters():
        if "embedding" in n_ or "head" in n_:
            nn.init.normal_(prm, std=0.02)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=a.wd)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(a.warmup, a.steps))
kw = dict(vocab_size=a.vocab, seq_len=a.T, num_kv_pairs=a.kv)
val = mqar(1000, split="validation", seed=0, **kw)
pool = mqar(a.pool, split="train", seed=a.seed, **kw) if a.pool else None
rf = a.layers * 2 + 1

def evaluate():
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(val["inputs"][i:i + 250])[0].argmax(-1) for i in range(0, 1000, 250)])
    model.train()
    r = recall_accuracy(pred, val["targets"], val["distances"], receptive_field=rf)
    return r["recall_accuracy"], r["recall_accuracy_within_rf"], r["recall_accuracy_beyond_rf"]

curve, t_train, g = [], 0.0, torch.Generator().manual_seed(a.seed)
for step in range(1, a.steps + 1):
    if pool is None:
        b = mqar(a.batch, split="train", seed=a.seed * 1_000_003 + step, **kw)
        x, y = b["inputs"], b["targets"]
    else:
        idx = torch.randint(0, a.pool, (a.batch,), generator=g)
        x, y = pool["inputs"][idx], pool["targets"][idx]
    t0 = time.perf_counter()
    _, loss = model(x, y)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    t_train += time.perf_counter() - t0
    if step % a.eval_every == 0 or step == a.steps:
        acc, w, bey = evaluate()
        curve.append(dict(step=step, loss=loss.item(), acc=acc, within=w, beyond=bey, train_s=round(t_train, 1)))
        print(json.dumps(curve[-1]), flush=True)
        if not math.isfinite(loss.item()):
            break
json.dump(dict(args=vars(a), curve=curve), open(a.out, "w"), indent=1)
