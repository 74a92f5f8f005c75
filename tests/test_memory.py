"""Memory over training steps: a loop must not grow, whichever backends this process has.

A machine without the native extension, or a GPU box without Triton, resolves ``backend="auto"``
past an unavailable backend on every call; nothing about that may keep a call's inputs alive.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import hgkernels as hk
from hgkernels import backends


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture
def missing(request, monkeypatch):
    """Makes the named registered backends unavailable the way a missing build does: their factory
    points at a module that does not exist and the registry instantiates them again."""
    names = [] if request.param == "none" else request.param.split("+")  # torch's backend is always there
    for name in names:
        monkeypatch.setitem(backends._FACTORIES, name, "hgkernels._not_built_in_this_test:Missing")
        monkeypatch.setitem(backends._INSTANCES, name, backends._instantiate(name))
        assert not backends.available(name)
    return request.param


def _main_job_step(net, head, opt, method, fused, gen):
    """One step of the Colored MNIST main job's shape, reduced: 2 environments, an MLP, the penalty."""
    x = torch.randn(96, 24, generator=gen)
    y = torch.randint(0, 2, (96,), generator=gen).float()
    envs = torch.randint(0, 2, (96,), generator=gen)
    envs[:2] = torch.tensor([0, 1])
    z = net(x)
    watch = [weakref.ref(x), weakref.ref(z)]
    if fused:
        out = hk.HessianAlignmentLoss(method, alpha=0.5, beta=0.5, loss="binary_cross_entropy")(head, z, y, envs)
        total = out.total
    else:
        logits = head(z)
        watch.append(weakref.ref(logits))
        erm = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y)
        if method == "fishr":
            total = erm + 0.5 * hk.fishr_penalty(logits, z, y, envs, loss="binary_cross_entropy")
        else:
            penalty_fn = hk.hgp_penalty if method == "hgp" else hk.hutchinson_penalty
            pen = penalty_fn(logits, z, y, envs, loss="binary_cross_entropy")
            total = erm + 0.5 * pen.hessian + 0.5 * pen.gradient
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return watch


# the default run keeps the case that grew (triton not installed, as after a plain install; the logits path)
# and Fishr on the native CPU plans
_DEFAULT_CASES = (("triton", "hgp", False), ("none", "fishr", False))
_CASES = [pytest.param(missing, method, fused,
                       marks=() if (missing, method, fused) in _DEFAULT_CASES else pytest.mark.slow,
                       id=f"{missing}-{method}-{'fused' if fused else 'logits'}")
          for missing in ("none", "native", "triton", "native+triton")
          for method, fused in (("hgp", False), ("hutchinson", False), ("hgp", True), ("fishr", False))]


@pytest.mark.parametrize("missing,method,fused", _CASES, indirect=["missing"])
def test_training_loop_frees_inputs_and_does_not_grow_with_a_backend_missing(missing, method, fused):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU())
    head = torch.nn.Linear(32, 1)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(20):  # warm-up: allocator pools, lazily built kernels
        _main_job_step(net, head, opt, method, fused, gen)
    gc.collect()
    rss_before = _rss_bytes()
    for step in range(200):
        watch = _main_job_step(net, head, opt, method, fused, gen)
        alive = [ref() is not None for ref in watch]
        assert not any(alive), f"step {step}: a call's inputs are still alive after backward ({alive})"
    gc.collect()
    growth = _rss_bytes() - rss_before
    # each step's inputs and activations are about 40 KB: 200 kept steps would be 8 MB
    assert growth < 4 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB over 200 steps"
