"""float32 within 1e-5 and bf16/fp16 inputs within 1e-2 of float64 (torch backend).

Low-precision inputs are compared with float64 computed on the *same rounded inputs*, so
what is measured is the library's arithmetic, not the rounding of the data."""
import pytest
import torch

import hgkernels as hk
from _helpers import assert_close, make_case, penalty_and_grads

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
