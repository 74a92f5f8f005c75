"""The sample (Gram) form: when `form="auto"` takes it, and how it compares with the C × Dh form.

Its float64 parity with `reference`, gradcheck, precision and properties run in the shared
suites (test_parity, test_gradcheck, test_precision, test_properties) with form="sample".
"""
import pytest
import torch

import hgkernels as hk
from hgkernels import _sample_space
from hgkernels.penalties import _common, hgp, hutchinson
from hgkernels._inputs import prepare
from _helpers import assert_close, make_case, penalty_and_grads


def _problem(n, d, c, e, loss="cross_entropy"):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (n,), generator=gen) if loss == "cross_entropy" else torch.rand(n, c, generator=gen)
    envs = torch.arange(n) % e
    return prepare(torch.randn(n, c, generator=gen), torch.randn(n, d, generator=gen), labels, envs, loss=loss,
                   bias=True)


def test_auto_weighs_the_backend_that_runs_the_feature_form():
    """PACS's HGP: the native kernels' C × Dh form is the faster, the torch backend's is not."""
    problem = _problem(96, 2048, 7, 3)
    assert _common.takes_sample_form("auto", problem, "hgp", "native") is False
    assert _common.takes_sample_form("auto", problem, "hgp", "torch") is True


def test_auto_skips_resolving_the_backend_only_where_no_backend_takes_the_sample_form():
    """`_sample_form` answers "feature form" before resolving the backend when the sample form loses even
    against the slowest C × Dh form (sample_space_possible): over a grid of heads, that shortcut never
    differs from the cost model on any backend."""
    backends = list(_sample_space.FEATURE_SLOWDOWN)
    for method in ("hutchinson", "hgp"):
        for n in (8, 24, 96, 384, 1536, 6144):
            for c in (1, 7, 65, 345, 1000):
                for dh in (6, 129, 513, 2049, 4097):
                    if not _sample_space.sample_space_possible(method, n, c, dh):
                        assert not any(_sample_space.prefers_sample_space(method, n, c, dh, b) for b in backends)


@pytest.mark.parametrize("shape,method,sample", [
    ((160, 2048, 345, 5), "hgp", True),             # DomainNet head: N ≪ C
    ((160, 2048, 345, 5), "hutchinson", True),
    ((96, 2048, 65, 3), "hgp", True),               # OfficeHome
    ((96, 2048, 7, 3), "hutchinson", False),        # PACS exact: few classes, the C × Dh form
    ((96, 2048, 7, 3), "hgp", False),               # PACS HGP: the native kernels' C × Dh form is faster
    ((3000, 64, 2, 2), "hgp", False),               # many samples, few classes
    ((3000, 64, 2, 2), "hutchinson", False),
    ((12, 5, 3, 3), "hutchinson", False),            # tiny: host overhead decides, the C × Dh form
    ((12, 5, 3, 3), "hgp", False),
])
def test_auto_takes_the_cheaper_form(shape, method, sample):
    problem = _problem(*shape)
    assert _common.takes_sample_form("auto", problem, method) is sample
    assert _common.takes_sample_form("feature", problem, method) is False
    assert _common.takes_sample_form("sample", problem, method) is True


@pytest.mark.parametrize("shape,method,backend,sample", [
    # DomainNet head (auto runs the torch backend there), N 1024: the C × Dh form (65 ms, sample 96); with 256
    # environments its (E, C, Dh) statistics are 724 MB each and take 3.5 s
    ((1024, 2048, 345, 4), "hutchinson", "torch", False),
    ((1024, 2048, 345, 256), "hutchinson", "torch", True),
    # PACS (native): the C × Dh form stays the faster (4.6 ms, sample 41)
    ((1024, 2048, 7, 256), "hgp", "native", False),
    ((1024, 2048, 7, 256), "hutchinson", "native", False),
])
def test_auto_weighs_the_number_of_environments(shape, method, backend, sample):
    """The C × Dh form's (E, C, Dh) statistics cost with E (benchmarks/many_envs.py), the sample form's do not."""
    assert _common.takes_sample_form("auto", _problem(*shape), method, backend) is sample


@pytest.mark.skipif(hk.backends.unavailable_reason("native") is not None, reason="the native CPU plans")
@pytest.mark.parametrize("method", ["hutchinson", "hgp"])
def test_auto_weighs_no_environment_statistics_where_the_native_plans_take_pairs(method):
    """64 environments of 2 at a PACS-sized head (N 128): the native CPU plans take pairs of samples and form
    no per-environment statistics (0.5-0.8 ms against 1.7-3.1 ms for the sample form), so auto keeps their
    C × Dh form; the torch backend's C × Dh form holds (E, C, Dh) statistics, and auto leaves it."""
    problem = _problem(128, 2048, 7, 64)
    native, torch_backend = hk.backends.select("native", problem), hk.backends.select("torch", problem)
    assert not native.forms_env_statistics(problem) and torch_backend.forms_env_statistics(problem)
    assert _common.takes_sample_form("auto", problem, method, "native") is False
    assert _common.takes_sample_form("auto", problem, method, "torch") is True


def test_one_environment_keeps_the_feature_form_even_when_asked():
    problem = _problem(20, 80, 50, 1)
    assert _sample_space.prefers_sample_space("hgp", 20, 50, 81)  # the cost model alone would pick it
    assert not _common.takes_sample_form("sample", problem, "hgp")
    assert not _common.takes_sample_form("auto", problem, "hgp")


@pytest.mark.parametrize("fn,kwargs", [
    (hk.hutchinson_penalty, {}),
    (hk.hgp_penalty, {"reference": "pooled", "detach_reference": True}),
    (hk.hgp_penalty, {"reference": "pooled", "detach_reference": False, "env_reduction": "sum"}),
], ids=["exact", "hgp detached", "hgp undetached"])
def test_auto_at_a_wide_head_runs_the_sample_form(monkeypatch, fn, kwargs):
    """form="auto" routes a many-class head to the sample plans, and their result is the feature form's."""
    case = make_case(3, loss="cross_entropy", bias=True, sizes=[9, 14, 5, 11], num_classes=120, num_features=300)
    used = []
    for plan in (hutchinson.SampleExactDiagPlan, hgp.SampleHGPPlan):
        monkeypatch.setattr(plan, "forward", lambda self, *a, _f=plan.forward: used.append(1) or _f(self, *a))
    auto = penalty_and_grads(fn, case, backend="torch", form="auto", **kwargs)
    assert used, "form='auto' did not take the sample form at C=120, N=39"
    feature = penalty_and_grads(fn, case, backend="torch", form="feature", **kwargs)
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), auto, feature):
        assert_close(a, b, 1e-11, name)


@pytest.mark.parametrize("method", ["exact", "hgp"])
def test_float32_wide_head_against_float64(method):
    """A DomainNet-like head scaled down (C=345, 5 environments, shuffled): float32 within 1e-5."""
    case = make_case(8, loss="cross_entropy", bias=True, sizes=[12, 7, 20, 9, 16], num_classes=345,
                     num_features=256, scale=3.0)
    fn = hk.hutchinson_penalty if method == "exact" else hk.hgp_penalty
    low = penalty_and_grads(fn, case, dtype=torch.float32, backend="torch", form="sample")
    high = penalty_and_grads(fn, case, backend="torch", form="feature")
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), low, high):
        assert_close(a, b, 1e-5, name)
