"""ImageNet-size heads (C = 1000, D = 2048, 4 x 32 samples; benchmarks/imagenet_head.py times them).

Two checks per penalty (HGP, exact Hutchinson, full Hessian, Fishr): on a reduced copy of the head's
structure (many more classes than samples per environment, ReLU features) the values and gradients equal
``backend="reference"`` (generic autograd, float64); and forward + backward never produce a tensor of
N·C·D elements or more (no per-sample (N, C, D) intermediate), by recording every tensor an operator
returns (a TorchDispatchMode) on a head where N·C·D is far above E·C·D and N²."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import hgkernels as hk

PENALTIES = {
    "hgp": hk.hgp_penalty,
    "hutchinson": hk.hutchinson_penalty,
    "full_hessian": hk.full_hessian_penalty,
    "fishr": hk.fishr_penalty,
}


def _head(n_e, e, c, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n_e * e, c, generator=g, dtype=dtype)).requires_grad_(True)
    features = torch.randn(n_e * e, d, generator=g, dtype=dtype).relu_().requires_grad_(True)
    return logits, features, torch.randint(0, c, (n_e * e,), generator=g), [n_e] * e


def _terms(name, logits, features, labels, sizes, **kw):
    out = PENALTIES[name](logits, features, labels, sizes, **kw)
    return [out] if isinstance(out, torch.Tensor) else [out.hessian, out.gradient]


@pytest.mark.parametrize("name", list(PENALTIES))
def test_reduced_imagenet_head_matches_reference(name):
    logits, features, labels, sizes = _head(3, 4, 20, 6, torch.float64)  # C > N, as at ImageNet
    forms = [{"form": "sample"}, {"form": "feature"}] if name in ("hgp", "hutchinson") else [{}]
    ref = _terms(name, logits, features, labels, sizes, backend="reference")
    weights = torch.tensor([0.7, 1.3][:len(ref)], dtype=torch.float64)
    ref_grads = torch.autograd.grad(sum(w * t for w, t in zip(weights, ref)), (logits, features))
    for form in forms:
        got = _terms(name, logits, features, labels, sizes, **form)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
        grads = torch.autograd.grad(sum(w * t for w, t in zip(weights, got)), (logits, features))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
        assert all(t.item() > 0 for t in got)


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("name", list(PENALTIES))
def test_no_per_sample_class_by_feature_intermediate(name):
    n_e, e, c, d = 16, 4, 250, 256  # N·C·D = 16.4M; E·C·(D+1) = 0.26M; N² = 4096
    logits, features, labels, sizes = _head(n_e, e, c, d, torch.float32)
    with _LargestOutput() as mode:
        terms = _terms(name, logits, features, labels, sizes, validate=False)
        sum(terms).backward()
    n = n_e * e
    assert mode.largest < n * c * d // 8, (mode.largest, mode.op)
    assert logits.grad is not None and features.grad.abs().sum() > 0


def test_the_recorder_sees_a_per_sample_intermediate():
    """Control: per-sample head gradients, (N, C, D), are caught (allocations inside a C++ kernel that
    bypass the dispatcher would not be: benchmarks/imagenet_head.py's peak memory covers those)."""
    logits, features, labels, sizes = _head(16, 4, 250, 256, torch.float32)
    with _LargestOutput() as mode:
        torch.einsum("nc,nd->ncd", logits.softmax(1), features).pow(2).sum().backward()
    assert mode.largest >= 64 * 250 * 256
