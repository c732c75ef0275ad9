"""Images/s of filterkit's MoCo v3 training step against a straightforward reference step,
alternated in one run on the same model, batch and device.

    python benchmarks/pretrain_speed.py [--preset vit-mini-8-32 --batch-size 128 --rounds 5]

The reference is written here from the paper's Algorithm 1, taken literally: four separate
forwards q1, q2 = f_q(x1), f_q(x2) and k1, k2 = f_k(x1), f_k(x2) where f_k is a plain copy of
f_q (the pseudocode has no no_grad, so the backward pass also runs through the key branch),
fp32, plain for-loop AdamW (foreach=False), and a per-parameter EMA loop. A second reference
adds only `torch.no_grad()` around the keys, to show how much of the gap that one line is.
filterkit's step (filterkit.train.train_step) batches both views through each backbone in
one call, computes keys under no_grad, uses multi-tensor AdamW and a multi-tensor EMA;
precision is the device's default (fp32 on CPU).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from filterkit.devices import autocast_dtype, pick_device
from filterkit.encoder import build_backbone
from filterkit.moco import MoCo, mlp
from filterkit.modeldir import ModelConfig
from filterkit.presets import get_preset
from filterkit.train import make_optimizer, train_step


def reference_ctr(q, k, tau):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return F.cross_entropy(q @ k.T / tau, torch.arange(len(q), device=q.device)) * 2 * tau


class ReferenceMoCo(torch.nn.Module):
    def __init__(self, backbone, dim, hidden, out_dim=256, tau=0.2, no_grad_keys=False):
        super().__init__()
        self.no_grad_keys = no_grad_keys
        self.f_q = torch.nn.Sequential(backbone, mlp(3, dim, hidden, out_dim))
        self.predictor = mlp(2, out_dim, hidden, out_dim)
        self.f_k = copy.deepcopy(self.f_q)
        self.tau = tau

    def step(self, optimizer, x1, x2, m):
        q1, q2 = self.predictor(self.f_q(x1)), self.predictor(self.f_q(x2))
        with torch.set_grad_enabled(not self.no_grad_keys):
            k1, k2 = self.f_k(x1), self.f_k(x2)
        loss = reference_ctr(q1, k2, self.tau) + reference_ctr(q2, k1, self.tau)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for pk, pq in zip(self.f_k.parameters(), self.f_q.parameters()):
                pk.mul_(m).add_(pq, alpha=1 - m)
        return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-mini-8-32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = pick_device(args.device)
    cfg = ModelConfig.from_preset(args.preset)
    hidden = get_preset(args.preset).recipe(device.type).head_hidden
    torch.manual_seed(0)
    ours = MoCo(build_backbone(cfg), cfg.embed_dim, 256, hidden, hidden).to(device)
    ours_opt = make_optimizer(ours, 1e-4, 0.1, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp = autocast_dtype(device, "auto")
    refs = {}
    for name, no_grad_keys in (("reference", False), ("ref+no_grad", True)):
        torch.manual_seed(0)
        ref = ReferenceMoCo(build_backbone(cfg), cfg.embed_dim, hidden, no_grad_keys=no_grad_keys).to(device)
        opt = torch.optim.AdamW([p for p in list(ref.f_q.parameters()) + list(ref.predictor.parameters())
                                 if p.requires_grad], lr=1e-4, weight_decay=0.1, foreach=False)
        refs[name] = (ref, opt)
    s = cfg.img_size
    x1 = torch.randn(args.batch_size, 3, s, s, device=device)
    x2 = torch.randn(args.batch_size, 3, s, s, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_ours():
        for _ in range(args.steps):
            train_step(ours, ours, ours_opt, scaler, x1, x2, 1e-4, 0.99, amp)

    def runner(name):
        ref, opt = refs[name]

        def run():
            for _ in range(args.steps):
                ref.step(opt, x1, x2, 0.99)
        return run

    sides = [("filterkit", run_ours)] + [(name, runner(name)) for name in refs]
    for _, fn in sides:
        fn()  # warm-up
    rates = {name: [] for name, _ in sides}
    for _ in range(args.rounds):
        for name, fn in sides:
            sync()
            start = time.perf_counter()
            fn()
            sync()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
    print(f"{args.preset}, batch {args.batch_size}, {device}, precision {str(amp).removeprefix('torch.') if amp else 'fp32'}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} alternating rounds "
          f"of {args.steps} steps")
    for name, values in rates.items():
        print(f"  {name:10s} {statistics.median(values):7.1f} img/s  [{', '.join(f'{v:.1f}' for v in values)}]")
    for name in refs:
        ratios = [a / b for a, b in zip(rates["filterkit"], rates[name])]
        print(f"  speed-up filterkit/{name}: median {statistics.median(ratios):.2f}x "
              f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
