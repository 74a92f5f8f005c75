"""Numerics: float32 within 1e-5 and bf16/fp16 inputs within 1e-2 of float64 (torch backend), and
extreme values (overflowing float32 logits, classes masked with -inf) alike on every path.

Low-precision inputs are compared with float64 computed on the *same rounded inputs*, so
what is measured is the library's arithmetic, not the rounding of the data."""
import pytest
import torch

import hgkernels as hk
from _helpers import ALL_PATHS, FORMS, PENALTIES, assert_close, make_case, penalty_and_grads, small_case

CASES = [
    dict(loss="cross_entropy", bias=True, sizes=[40, 17, 33], num_classes=7, num_features=24),
    dict(loss="binary_cross_entropy", bias=True, sizes=[60, 45], num_classes=1, num_features=39),
    dict(loss="mse", bias=False, sizes=[20, 31, 9, 25], num_classes=5, num_features=16),
]
METHODS = {
    "exact": (hk.hutchinson_penalty, {}),
    "stochastic": (hk.hutchinson_penalty, dict(estimator="hutchinson", num_probes=8)),
    "hgp": (hk.hgp_penalty, dict(detach_reference=False)),
    "exact, sample form": (hk.hutchinson_penalty, dict(form="sample")),
    "hgp, sample form": (hk.hgp_penalty, dict(detach_reference=False, form="sample")),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_kw", CASES, ids=lambda kw: kw["loss"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_low_precision_against_float64(method, case_kw, dtype, rtol):
    fn, kwargs = METHODS[method]
    case = make_case(31, **case_kw)
    rounded = make_case(31, **case_kw)
    rounded.logits, rounded.features = (t.to(dtype).to(torch.float64) for t in (case.logits, case.features))
    if case.loss != "cross_entropy":
        rounded.labels = case.labels.to(dtype).to(torch.float64)
        case.labels = rounded.labels.to(dtype)
    seeded = lambda: dict(generator=torch.Generator().manual_seed(9)) if method == "stochastic" else {}
    low = penalty_and_grads(fn, case, dtype=dtype, backend="torch", **kwargs, **seeded())
    high = penalty_and_grads(fn, rounded, dtype=torch.float64, backend="torch", **kwargs, **seeded())
    assert low[0].dtype == (torch.float32 if dtype != torch.float64 else dtype)
    assert low[2].dtype == dtype and low[3].dtype == dtype
    for name, a, b in zip(("hessian term", "gradient term", "d logits", "d features"), low, high):
        assert_close(a, b, rtol, f"{dtype} {name}")


@pytest.mark.parametrize("method", sorted(PENALTIES))
def test_huge_float32_mse_logits_overflow_alike_in_both_forms(method):
    case = small_case(17, loss="mse", sizes=(6, 5), c=1, dtype=torch.float32)
    logits = case.logits * 1e30
    values = [PENALTIES[method](logits, case.features, case.labels, case.envs, loss="mse", form=form,
                                backend="torch", validate=False) for form in FORMS]
    for term in ("hessian", "gradient"):
        got = [getattr(v, term) for v in values]
        assert not any(torch.isnan(g) for g in got), f"{term}: {got}"
        assert torch.equal(torch.isinf(got[0]), torch.isinf(got[1])), f"{term}: {got}"


@pytest.mark.parametrize("backend,form", ALL_PATHS[:4])
def test_masked_classes_with_minus_inf_logits(backend, form):
    case = small_case(18, c=4)
    logits = case.logits.clone()
    logits[::3, 1] = float("-inf")
    labels = torch.where(case.labels == 1, 0, case.labels)
    want = hk.hgp_penalty(logits, case.features, labels, case.envs, backend="reference")
    got = hk.hgp_penalty(logits, case.features, labels, case.envs, backend=backend, form=form)
    assert_close(got.hessian, want.hessian, 1e-10, "hessian")
    assert_close(got.gradient, want.gradient, 1e-10, "gradient")
    for bad, match in ((float("nan"), "NaN"), (float("inf"), r"\+Inf")):
        worse = logits.clone()
        worse[0, 2] = bad
        with pytest.raises(ValueError, match=match):
            hk.hgp_penalty(worse, case.features, labels, case.envs, backend=backend, form=form)
    masked_row = logits.clone()
    masked_row[2] = float("-inf")
    with pytest.raises(ValueError, match="every entry is -inf"):
        hk.hgp_penalty(masked_row, case.features, labels, case.envs, backend=backend, form=form)
