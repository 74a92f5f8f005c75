"""Hundreds of environments of a few samples each: every penalty, in both forms, on every closed-form
backend, equals float64 autograd (`backend="reference"`, 1e-9), shuffled ids and size lists alike.
Time and memory at the PACS and DomainNet heads: benchmarks/many_envs.py."""
import pytest
import torch

import hgkernels as hk
from hgkernels import backends
from hgkernels._inputs import prepare
from hgkernels.penalties import fishr as fishr_module
from _helpers import assert_close

E, C, D = 256, 3, 4
RTOL = 1e-9
CLOSED_FORM_BACKENDS = [name for name in ("torch", "native", "triton") if backends.unavailable_reason(name) is None]


def _case():
    """E environments of 2 to 8 samples, ids shuffled; and the same samples grouped with a size list."""
    gen = torch.Generator().manual_seed(11)
    sizes = torch.randint(2, 9, (E,), generator=gen).tolist()
    n = sum(sizes)
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(sizes))[torch.randperm(n, generator=gen)]
    logits = 1.5 * torch.randn(n, C, generator=gen, dtype=torch.float64)
    features = torch.randn(n, D, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (n,), generator=gen)
    return logits, features, labels, ids, sizes


PENALTIES = {
    "hutchinson": (hk.hutchinson_penalty, ("feature", "sample")),
    "hgp": (hk.hgp_penalty, ("feature", "sample")),
    "hgp, undetached mean reference": (lambda *a, **k: hk.hgp_penalty(*a, reference="mean", detach_reference=False,
                                                                      **k), ("feature", "sample")),
    "full_hessian": (hk.full_hessian_penalty, (None,)),
    "fishr": (lambda *a, **k: (hk.fishr_penalty(*a, **k),), (None,)),
}
CASES = [(name, form) for name, (_, forms) in PENALTIES.items() for form in forms]

_REFERENCE = {}


def _run(name, form, backend, as_sizes, dtype=torch.float64):
    """Terms and gradients; with `as_sizes` on the samples grouped by environment, gradients put back
    in the shuffled order."""
    fn = PENALTIES[name][0]
    logits, features, labels, ids, sizes = _case()
    order = torch.argsort(ids, stable=True) if as_sizes else torch.arange(len(ids))
    logits, features = (t[order].to(dtype).requires_grad_(True) for t in (logits, features))
    envs = sizes if as_sizes else ids
    options = {} if form is None or backend == "reference" else dict(form=form)
    terms = fn(logits, features, labels[order], envs, backend=backend, **options)
    total = sum(w * t for w, t in zip((0.7, 1.3), terms))
    d_logits, d_features = (torch.empty_like(g).index_copy_(0, order, g)
                            for g in torch.autograd.grad(total, (logits, features)))
    return [t.detach() for t in terms] + [d_logits, d_features]


# (backend, as_sizes): every closed-form backend on shuffled ids and a size list; the Triton interpreter
# (25-80 s a case, slow-marked) on the ids layout only
LAYOUTS = [pytest.param(b, as_sizes, id=f"{b}-{'size list' if as_sizes else 'shuffled ids'}",
                        marks=[pytest.mark.slow] if b == "triton" else [])
           for b in CLOSED_FORM_BACKENDS for as_sizes in (False, True) if not (b == "triton" and as_sizes)]


def _reference(name):
    if name not in _REFERENCE:
        _REFERENCE[name] = _run(name, None, "reference", False)
    return _REFERENCE[name]


@pytest.mark.parametrize("backend,as_sizes", LAYOUTS)
@pytest.mark.parametrize("name,form", CASES, ids=[f"{n}-{f or 'only form'}" for n, f in CASES])
def test_256_environments_of_2_to_8_samples_equal_the_reference(name, form, backend, as_sizes):
    """float64 to 1e-9; the Triton kernels (float32 only) to 1e-5, on the ids layout."""
    dtype, rtol = (torch.float32, 1e-5) if backend == "triton" else (torch.float64, RTOL)
    got = _run(name, form, backend, as_sizes, dtype)
    names = (["penalty"] if len(got) == 3 else ["hessian term", "gradient term"]) + ["d logits", "d features"]
    for what, a, b in zip(names, got, _reference(name)):
        assert_close(a, b, rtol, f"{name} {form} {backend}: {what}")


@pytest.mark.parametrize("backend,as_sizes", LAYOUTS)
def test_fishr_in_chunks_of_environments_equals_the_reference(monkeypatch, backend, as_sizes):
    """Beyond CHUNK_ENTRIES variance entries fishr_penalty walks the environments in chunks (here of
    4 environments, 60 entries), never holding the (E, C·Dh) variances."""
    monkeypatch.setattr(fishr_module, "CHUNK_ENTRIES", 4 * C * (D + 1))
    logits, features, labels, ids, sizes = _case()
    assert fishr_module.envs_per_chunk(prepare(logits, features, labels, ids, loss="cross_entropy", bias=True)) == 4
    dtype, rtol = (torch.float32, 1e-5) if backend == "triton" else (torch.float64, RTOL)
    got = _run("fishr", None, backend, as_sizes, dtype)
    for what, a, b in zip(("penalty", "d logits", "d features"), got, _reference("fishr")):
        assert_close(a, b, rtol, f"chunked fishr {backend}: {what}")


def test_fishr_in_chunks_double_backward_matches_the_reference(monkeypatch):
    monkeypatch.setattr(fishr_module, "CHUNK_ENTRIES", 4 * C * (D + 1))
    logits, features, labels, ids, _ = _case()
    results = []
    for backend in ("native" if "native" in CLOSED_FORM_BACKENDS else "torch", "reference"):
        lg, ft = logits.clone().requires_grad_(True), features.clone().requires_grad_(True)
        d_lg, d_ft = torch.autograd.grad(hk.fishr_penalty(lg, ft, labels, ids, backend=backend), (lg, ft),
                                         create_graph=True)
        results.append(torch.autograd.grad((d_lg.square().sum() + d_ft.square().sum()), (lg, ft)))
    for what, a, b in zip(("d logits", "d features"), *results):
        assert_close(a, b, RTOL, f"second order: {what}")
