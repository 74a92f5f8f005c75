"""Quickstart: ERM vs HGP on a toy problem whose shortcut reverses at test time (seconds on a CPU).

Every sample has an invariant feature, which agrees with the label 75% of the time everywhere, and a
spurious one, which agrees 90% and 80% of the time in the two training environments but 10% in the
test environment. ERM leans on the spurious feature and fails the test; the HGP penalty aligns the
environments' head gradients and Hessian-gradient products, which leaves the invariant feature.
The README shows this file's code below this docstring.
"""
import torch
from torch import nn

import hgkernels


def environment(n, p_spurious, gen):  # labels; features: invariant (75% right), spurious, 8 of noise
    y = torch.randint(0, 2, (n,), generator=gen)
    agree = lambda p: (2.0 * y - 1) * torch.where(torch.rand(n, generator=gen) < p, 1.0, -1.0)  # noqa: E731
    return torch.stack([agree(0.75), agree(p_spurious), *torch.randn(8, n, generator=gen)], 1), y


def train(name, alpha, beta, n=2000, steps=500, warmup=100):
    gen = torch.Generator().manual_seed(0)
    (x0, y0), (x1, y1), (x_test, y_test) = [environment(n, p, gen) for p in (0.9, 0.8, 0.1)]
    x, y, envs = torch.cat([x0, x1]), torch.cat([y0, y1]), [n, n]  # envs: sizes of the grouped environments
    torch.manual_seed(0)
    featurizer, head = nn.Sequential(nn.Linear(10, 32), nn.ReLU()), nn.Linear(32, 2)
    criterion = hgkernels.HessianAlignmentLoss("hgp", alpha=0.0, beta=0.0)  # or "hutchinson"
    optimizer = torch.optim.Adam([*featurizer.parameters(), *head.parameters()], lr=1e-2)
    for step in range(steps):
        if step == warmup:  # ERM first: an untrained network has little to align
            criterion.alpha, criterion.beta = alpha, beta
        out = criterion(head, featurizer(x), y, envs)  # out.total = out.erm + alpha * out.hessian + beta * out.gradient
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
    with torch.no_grad():
        test_acc = (head(featurizer(x_test)).argmax(1) == y_test).float().mean()
    print(f"{name}: train acc {(out.logits.argmax(1) == y).float().mean():.1%}, test acc {test_acc:.1%}, "
          f"penalty terms: hessian {out.hessian:.1e}, gradient {out.gradient:.1e}")


torch.set_num_threads(1)  # a problem this small runs fastest on one thread
train("ERM", alpha=0.0, beta=0.0)
train("HGP", alpha=91257.0, beta=91257.0)  # Colored MNIST's weight; see "Choosing alpha and beta"
