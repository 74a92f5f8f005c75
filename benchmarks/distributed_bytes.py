"""Collectives and bytes all-reduced per training step by the penalties with a process_group.

Runs the real code path on a one-rank gloo group (the collectives are real calls; their count and
size do not depend on the number of ranks) and reads the counters of `hgkernels.distributed.
GlobalStats`. Prints a Markdown table next to DistributedDataParallel's own gradient all-reduce for a
ResNet-50 featurizer (23.5 M parameters, float32: a figure on paper).

    python benchmarks/distributed_bytes.py
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Dict, List

import torch
import torch.distributed as dist

import hgkernels as hk
from hgk_bench import case, progress  # benchmarks/ is the script's folder, first on sys.path

HEADS = {"cmnist": dict(n=24000, d=390, c=1, e=2, loss="binary_cross_entropy"),
         "pacs": dict(n=96, d=2048, c=7, e=3, loss="cross_entropy"),
         "domainnet": dict(n=160, d=2048, c=345, e=5, loss="cross_entropy")}
SMOKE_HEADS = {"tiny": dict(n=12, d=5, c=3, e=3, loss="cross_entropy")}
RESNET50_FEATURIZER_PARAMS = 23_508_032  # torchvision resnet50 without its fc layer
PENALTIES = ("hutchinson", "hgp", "hutchinson 300 probes")


def count_step(head: Dict, penalty: str) -> Dict[str, int]:
    """Collectives and bytes of one forward + backward at `head` (float32)."""
    gen = torch.Generator().manual_seed(0)
    n, d, c, e = head["n"], head["d"], head["c"], head["e"]
    logits = torch.randn(n, c, generator=gen).requires_grad_(True)
    features = torch.randn(n, d, generator=gen).requires_grad_(True)
    labels = (torch.randint(0, c, (n,), generator=gen) if head["loss"] == "cross_entropy"
              else torch.rand(n, c, generator=gen))
    envs = [n // e] * (e - 1) + [n - (n // e) * (e - 1)]
    common = dict(loss=head["loss"], process_group=dist.group.WORLD, validate=False)
    if penalty == "hgp":
        pen = hk.hgp_penalty(logits, features, labels, envs, **common)
    elif penalty == "hutchinson":
        pen = hk.hutchinson_penalty(logits, features, labels, envs, **common)
    else:
        pen = hk.hutchinson_penalty(logits, features, labels, envs, estimator="hutchinson", num_probes=300,
                                    generator=torch.Generator().manual_seed(1), **common)
    stats = pen.hessian.grad_fn.backend  # the GlobalStats of this call
    forward = (stats.collectives, stats.bytes_reduced)
    (pen.hessian + pen.gradient).backward()
    return {"forward collectives": forward[0], "forward bytes": forward[1],
            "backward collectives": stats.collectives - forward[0], "backward bytes": stats.bytes_reduced - forward[1]}


def table(heads: Dict[str, Dict]) -> List[str]:
    rows = ["| head | penalty | collectives fwd / bwd | bytes per step | vs DDP's ResNet-50 gradients |",
            "|---|---|---|---|---|"]
    ddp_bytes = RESNET50_FEATURIZER_PARAMS * 4
    for name, head in heads.items():
        for penalty in PENALTIES:
            with case(f"{name} {penalty}"):
                got = count_step(head, penalty)
            total = got["forward bytes"] + got["backward bytes"]
            rows.append(f"| {name} (N={head['n']}, D={head['d']}, C={head['c']}, E={head['e']}) | {penalty} | "
                        f"{got['forward collectives']} / {got['backward collectives']} | {total:,} | "
                        f"{100 * total / ddp_bytes:.3f}% of {ddp_bytes / 2**20:.0f} MiB |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny head, for CI")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        progress("one-rank gloo group: starting")
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        try:
            print("\n".join(table(SMOKE_HEADS if args.smoke else HEADS)))
        finally:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
