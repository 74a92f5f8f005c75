"""FSDP2 (torch.distributed.fsdp.fully_shard) on gloo CPU ranks: the penalties' values and the gathered
parameter gradients equal the one-process run on the concatenated batch (float64, 1e-10), on the
logits path and through `HessianAlignmentLoss` given the sharded head (which takes the logits path:
calling the head gathers its weight); the fused function given a sharded (DTensor) weight raises.

The harness is tests/test_distributed.py's: spawned workers, a timeout on every collective, the parent
kills workers that outlive theirs, so a failure never hangs.
"""

import pytest
import torch

import hgkernels as hk
from _helpers import run_cases_on_ranks
from test_distributed import _case, _data, _local_inputs, _model, _shards, _single_process

pytestmark = pytest.mark.slow  # several processes per test

TIMEOUT_S = 60
ALPHA, BETA = 0.6, 1.7
METHOD_NAMES = {"hgp": "hgp", "hutchinson": "hutchinson", "full": "full_hessian"}


def _sharded_model(num_classes, head_sharded=True):
    from torch.distributed.fsdp import fully_shard
    model = _model(num_classes)
    fully_shard(model.featurizer)
    if head_sharded:
        fully_shard(model.head)
    fully_shard(model)
    return model


def _gathered_grads(model):
    return torch.cat([(p.grad.full_tensor() if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype)).flatten()
                      for p in model.parameters()]).tolist()


def _run_rank(case, rank, world, group):
    x, y, ids = _data(case["loss"], 3)
    xs, ys, envs, extra = _local_inputs(case, x, y, ids, _shards(case["shards"], ids, world)[rank])
    options = dict(loss=case["loss"], env_reduction=case["reduction"], detach_reference=case["detach"],
                   backend=case["backend"], process_group=group, **extra)
    criterion = hk.HessianAlignmentLoss(METHOD_NAMES[case["method"]], ALPHA, BETA, **options)
    if case["path"] == "fused_error":  # the fused function given the sharded weight itself
        model = _sharded_model(3, head_sharded=case.get("head_sharded", True))
        model(xs)[1].sum().backward()  # a step: afterwards (root included) the parameters are sharded DTensors
        features = model.featurizer(xs)
        try:
            if case.get("module"):
                criterion(model.head, features, ys, envs)
            else:
                hk.linear_head_alignment(features, model.head.weight, model.head.bias, ys, envs,
                                         method=METHOD_NAMES[case["method"]], **options)
        except TypeError as err:
            return str(err)
        return "no error"
    model = _sharded_model(3)
    if case["path"] == "logits":
        features, logits = model(xs)
        out = criterion(logits, features, ys, envs)
    else:  # the head module: HessianAlignmentLoss calls it (FSDP2's hook gathers the weight)
        with torch.no_grad():
            model(xs)
        features = model.featurizer(xs)
        out = criterion(model.head, features, ys, envs)
    out.total.backward()
    return [float(out.hessian.detach()), float(out.gradient.detach()), _gathered_grads(model)]


def _spawn(world, cases, tmp_path):
    return run_cases_on_ranks(_run_rank, world, cases, tmp_path, "fsdp", TIMEOUT_S)


def _fsdp_case(path, **kw):
    return dict(_case(**kw), path=path)


CASES = [
    _fsdp_case("logits"),
    _fsdp_case("logits", method="hutchinson", shards="uneven", envs="sizes"),
    _fsdp_case("logits", method="full", shards="missing", detach=False, reduction="sum"),
    _fsdp_case("head"),
    _fsdp_case("head", method="hutchinson", shards="missing", loss="binary_cross_entropy"),
    _fsdp_case("head", method="full", shards="uneven", backend="torch"),
]


def _check(world, tmp_path):
    errors = {"values": 0.0, "grads": 0.0, "values_abs": 0.0, "grads_abs": 0.0}
    for case, per_rank in zip(CASES, _spawn(world, CASES, tmp_path)):
        assert {status for status, _ in per_rank} == {"ok"}, f"{case}: {per_rank}"
        # test_distributed's one-process run (C = 3 for cross-entropy); BCE here has C = 3 soft targets
        hessian, gradient, grads = (_single_process(case, world) if case["loss"] == "cross_entropy"
                                    else _single_bce(case, world, 3))
        for _, (h, g, rank_grads) in per_rank:
            for got, want in ((h, hessian), (g, gradient)):
                err = abs(got - want) / max(abs(want), 1e-30)
                errors["values_abs"] = max(errors["values_abs"], abs(got - want))
                errors["values"] = max(errors["values"], err)
                assert err <= 1e-10, f"{case}: {got} vs {want}"
            rank_grads = torch.tensor(rank_grads, dtype=torch.float64)
            err = float((rank_grads - grads).abs().max() / grads.abs().max())
            errors["grads_abs"] = max(errors["grads_abs"], float((rank_grads - grads).abs().max()))
            errors["grads"] = max(errors["grads"], err)
            assert err <= 1e-10, f"{case}: gradient relative error {err:.2e}"
    print(f"FSDP2, {world} ranks: max relative difference, values {errors['values']:.1e}, gradients "
          f"{errors['grads']:.1e}; max absolute, values {errors['values_abs']:.1e}, gradients {errors['grads_abs']:.1e}")


def _single_bce(case, world, num_classes):
    """_single_process for BCE with C = 3 soft targets (test_distributed's BCE cases have C = 1)."""
    from hgkernels.module import _local_erm
    x, y, ids = _data(case["loss"], num_classes)
    model = _model(num_classes)
    feats, logits = model(x)
    fn = {"hgp": hk.hgp_penalty, "full": hk.full_hessian_penalty}.get(case["method"], hk.hutchinson_penalty)
    pen = fn(logits, feats, y, ids, loss=case["loss"], env_reduction=case["reduction"],
             detach_reference=case["detach"], backend=case["backend"])
    parts = _shards(case["shards"], ids, world)
    erm = torch.stack([_local_erm(logits[p], y[p], ids[p], case["loss"], 3) if p.numel() else logits.sum() * 0
                       for p in parts]).mean()
    (ALPHA * pen.hessian + BETA * pen.gradient + erm).backward()
    return float(pen.hessian.detach()), float(pen.gradient.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    _check(2, tmp_path)


def test_fsdp2_three_ranks_equal_one_process(tmp_path):
    _check(3, tmp_path)


def test_fsdp2_sharded_weight_in_the_fused_function_raises(tmp_path):
    cases = [_fsdp_case("fused_error"), _fsdp_case("fused_error", module=True, head_sharded=False)]
    for case, per_rank in zip(cases, _spawn(2, cases, tmp_path)):
        for status, message in per_rank:
            assert status == "ok", message
            assert "weight is a DTensor" in message and "fully_shard(head)" in message, message
