"""Large CPU outputs on huge pages (opt-in, HGK_HUGE_PAGES=1): same tensors, same numbers."""
import pytest
import torch

import hgkernels as hk
from hgkernels import _memory
from hgkernels.backends import native
from _helpers import make_case, penalty_and_grads


def test_disabled_by_default_gives_a_plain_tensor(monkeypatch):
    monkeypatch.setattr(_memory, "ENABLED", False)
    out = _memory.empty_output((3000, 700), torch.float32, torch.device("cpu"))
    assert out.shape == (3000, 700) and out.dtype == torch.float32 and out.is_contiguous()
    assert out.storage_offset() == 0


@pytest.mark.skipif(_memory._madvise is None, reason="madvise is Linux-only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_enabled_output_starts_on_a_huge_page_and_is_an_ordinary_tensor(monkeypatch, dtype):
    monkeypatch.setattr(_memory, "ENABLED", True)
    shape = (3000, 700)  # 8.4 / 16.8 MB
    out = _memory.empty_output(shape, dtype, torch.device("cpu"))
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
    assert out.data_ptr() % _memory.HUGE_PAGE == 0
    assert out.untyped_storage().nbytes() <= out.numel() * out.element_size() + _memory.HUGE_PAGE
    out.fill_(2.0)
    assert out.sum().item() == 2.0 * out.numel()
    small = _memory.empty_output((10, 10), dtype, torch.device("cpu"))  # below MIN_HUGE_BYTES: plain
    assert small.storage_offset() == 0


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_gradients_are_bitwise_the_same_with_huge_pages(monkeypatch, backend):
    if backend == "native" and native._CPU is None:
        pytest.skip(f"native backend not built (test_native fails for that under CI): {native._CPU_ERROR}")
    case = make_case(4, loss="binary_cross_entropy", bias=True, sizes=[12000, 8000], num_classes=1,
                     num_features=70, dtype=torch.float32)  # d_features 5.6 MB
    runs = []
    for enabled in (False, True):
        monkeypatch.setattr(_memory, "ENABLED", enabled)
        runs.append(penalty_and_grads(hk.hgp_penalty, case, backend=backend, detach_reference=False))
    for name, a, b in zip(("hessian", "gradient", "d logits", "d features"), *runs):
        assert torch.equal(a, b), name
