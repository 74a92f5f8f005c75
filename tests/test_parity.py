"""The torch backend against the generic-autograd `reference` path in float64 (≤ 1e-10 relative).

The exact and HGP penalties run in both forms: C × Dh statistics ("feature") and N × N
Gram matrices ("sample").

Each seed draws a fresh configuration: loss kind, bias, 1–6 environments of unequal
sizes (size 1 included), shuffled ids or a size list, C in 1–50, D in 1–64, both
references, both reductions, detach on/off. Values and gradients w.r.t. logits and
features are compared.
"""
import random

import pytest
import torch

import hgkernels as hk
from _helpers import assert_close, make_case, penalty_and_grads

LOSSES = ("cross_entropy", "binary_cross_entropy", "mse")
RTOL = 1e-10


def random_config(seed: int, max_head_params: int):
    rng = random.Random(seed)
    num_envs = rng.randint(1, 6)
    sizes = [rng.choice([1, rng.randint(2, 5), rng.randint(6, 25)]) for _ in range(num_envs)]
    c = rng.choice([1, rng.randint(2, 10), rng.randint(11, 50)])
    d = rng.choice([1, rng.randint(2, 16), rng.randint(17, 64)])
    while c * (d + 1) > max_head_params:  # the reference exact diagonal costs one HVP per parameter
        d = max(1, d // 2)
        if d == 1:
            c = max(1, c // 2)
    return dict(loss=LOSSES[seed % 3], bias=rng.random() < 0.7, sizes=sizes, num_classes=c, num_features=d,
                as_sizes=rng.random() < 0.25), dict(
        env_reduction=rng.choice(["mean", "sum"]), detach_reference=rng.random() < 0.5)


# The reference (generic autograd; the exact diagonal costs an HVP per head parameter) is the slow side:
# each case's is computed once and compared with both forms.
_REFERENCES = {}


def check_parity(fn, case, form="feature", *, case_key, **kwargs):
    ours = penalty_and_grads(fn, case, backend="torch", form=form, **kwargs)
    key = (fn.__name__, case_key, tuple(sorted(kwargs.items())))
    if key not in _REFERENCES:
        _REFERENCES[key] = penalty_and_grads(fn, case, backend="reference", **kwargs)
    ref = _REFERENCES[key]
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), ours, ref):
        assert_close(a, b, RTOL, name)


FORMS = ("feature", "sample")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seed", range(36))
def test_hgp_matches_reference(seed, form):
    case_kw, opts = random_config(seed, max_head_params=50 * 65)
    case = make_case(seed, **case_kw)
    check_parity(hk.hgp_penalty, case, form, case_key=seed, reference=random.Random(seed).choice(["pooled", "mean"]),
                 **opts)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seed", range(36))
def test_exact_hutchinson_matches_reference(seed, form):
    case_kw, opts = random_config(1000 + seed, max_head_params=200)
    check_parity(hk.hutchinson_penalty, make_case(seed, **case_kw), form, case_key=seed, **opts)


@pytest.mark.parametrize("seed", range(24))
def test_stochastic_hutchinson_matches_reference_at_same_probes(seed):
    case_kw, opts = random_config(2000 + seed, max_head_params=50 * 65)
    case = make_case(seed, **case_kw)
    ours = penalty_and_grads(hk.hutchinson_penalty, case, backend="torch", estimator="hutchinson", num_probes=3,
                             generator=torch.Generator().manual_seed(seed), **opts)
    ref = penalty_and_grads(hk.hutchinson_penalty, case, backend="reference", estimator="hutchinson", num_probes=3,
                            generator=torch.Generator().manual_seed(seed), **opts)
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), ours, ref):
        assert_close(a, b, RTOL, name)


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("loss", LOSSES)
def test_exact_hutchinson_largest_head(loss, form):
    """C = 50, D = 64: the top of the required range for the exact diagonal too."""
    case = make_case(7, loss=loss, bias=True, sizes=[9, 4], num_classes=50, num_features=64)
    check_parity(hk.hutchinson_penalty, case, form, case_key=("largest head", loss), env_reduction="sum",
                 detach_reference=False)


@pytest.mark.parametrize("kind", ["gradient", "hess_diag", "hvp"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bias", [True, False])
def test_head_statistics_match_reference(kind, loss, bias):
    case = make_case(11, loss=loss, bias=bias, sizes=[5, 1, 8], num_classes=4, num_features=6)
    gen = torch.Generator().manual_seed(5)
    vec_w = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    vec_b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    results = []
    for backend in ("torch", "reference"):
        logits, features = case.leaves()
        if kind == "gradient":
            out = hk.head_gradient(logits, features, case.labels, case.envs, loss=loss, bias=bias, backend=backend)
        elif kind == "hess_diag":
            out = hk.head_hessian_diag(logits, features, case.labels, case.envs, loss=loss, bias=bias,
                                       backend=backend)
        else:
            out = hk.head_hvp(logits, features, case.labels, case.envs, (vec_w, vec_b), loss=loss, bias=bias,
                              backend=backend)
        assert out.weight.shape == (3, 4, 6) and (out.bias is None) == (not bias)
        flat = torch.cat([out.weight.flatten()] + ([out.bias.flatten()] if bias else []))
        weights = torch.linspace(-1, 1, flat.numel(), dtype=torch.float64)
        inputs = [logits, features] + ([vec_w] + ([vec_b] if bias else []) if kind == "hvp" else [])
        results.append([flat.detach()] + list(torch.autograd.grad((flat * weights).sum(), inputs, materialize_grads=True)))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, RTOL, f"{kind} output #{i}")


@pytest.mark.parametrize("as_sizes", [False, True])
@pytest.mark.parametrize("loss", LOSSES)
def test_torch_backend_chunking_matches_one_chunk(monkeypatch, loss, as_sizes):
    """Cases here fit one chunk; walking the slots a few rows at a time (shuffled ids, and grouped
    equal sizes where chunks are views) gives the same penalties and gradients."""
    from hgkernels.backends import torch_backend
    sizes = [7, 7, 7] if as_sizes else [5, 1, 9, 4]
    case = make_case(11, loss=loss, bias=True, sizes=sizes, num_classes=4, num_features=6, as_sizes=as_sizes)
    runs = [(hk.hutchinson_penalty, {}), (hk.hgp_penalty, {"detach_reference": False}),
            (hk.hutchinson_penalty, {"estimator": "hutchinson", "num_probes": 3, "detach_reference": False})]
    for fn, kwargs in runs:
        def run():
            extra = {"generator": torch.Generator().manual_seed(0)} if "estimator" in kwargs else {}
            return penalty_and_grads(fn, case, backend="torch", **kwargs, **extra)
        whole = run()
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 3 * 6 * 3)  # a few rows per chunk
        chunked = run()
        monkeypatch.undo()
        for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), chunked, whole):
            assert_close(a, b, 1e-12, f"{fn.__name__} {kwargs}: {name}")
