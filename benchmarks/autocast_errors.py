"""Inside torch.autocast (CPU, bfloat16 and float16): each function's outputs and gradients against the
float32 computation, outside autocast, on the same inputs up-cast to float32.

Max relative error (max |a - b| / max |b|) per function, backend and autocast dtype, over both mixes
(half logits beside float32 features, and the reverse): the outputs and the float32 input's gradient
(float32 rounding only), and the half input's gradient (its dtype's rounding of the float32 one, up to
2^-8 for bfloat16, 2^-11 for float16). tests/test_autocast.py asserts the same bounds.

    python benchmarks/autocast_errors.py
"""
from __future__ import annotations

import torch

import hgkernels as hk
from hgkernels import backends

SIZES, C, D = [40, 57, 31], 7, 24


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def _stat(fn):
    return lambda *a, **k: [t for t in fn(*a, **k) if t is not None]


FUNCTIONS = {
    "hutchinson_penalty (feature form)": lambda *a, **k: list(hk.hutchinson_penalty(*a, form="feature", **k)),
    "hutchinson_penalty (sample form)": lambda *a, **k: list(hk.hutchinson_penalty(*a, form="sample", **k)),
    "hgp_penalty (feature form)": lambda *a, **k: list(hk.hgp_penalty(*a, form="feature", **k)),
    "hgp_penalty (sample form)": lambda *a, **k: list(hk.hgp_penalty(*a, form="sample", **k)),
    "full_hessian_penalty": lambda *a, **k: list(hk.full_hessian_penalty(*a, **k)),
    "fishr_penalty": lambda *a, **k: [hk.fishr_penalty(*a, **k)],
    "FishrLoss": lambda *a, **k: [hk.FishrLoss(len(SIZES), C, D, **k)(*a)],
    "head_gradient": _stat(hk.head_gradient),
    "head_hessian_diag": _stat(hk.head_hessian_diag),
    "head_gradient_variance": _stat(hk.head_gradient_variance),
    "HessianAlignmentLoss (logits)": lambda *a, **k: list(hk.HessianAlignmentLoss("hgp", **k)(*a)),
}


def _run(name, logits, features, labels, envs, backend):
    outputs = FUNCTIONS[name](logits, features, labels, envs, backend=backend)
    gen = torch.Generator().manual_seed(0)
    total = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    return outputs, torch.autograd.grad(total, (logits, features))


def main() -> int:
    gen = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    logits, features = 1.5 * torch.randn(n, C, generator=gen), torch.randn(n, D, generator=gen)
    labels = torch.randint(0, C, (n,), generator=gen)
    envs = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))[torch.randperm(n, generator=gen)]
    names = [b for b in ("torch", "native", "triton") if backends.unavailable_reason(b) is None] + ["reference"]
    print("| function | backend | autocast | outputs | float32 input's gradient | half input's gradient |")
    print("|---|---|---|---|---|---|")
    for name in FUNCTIONS:
        for backend in names:
            if backend == "reference" and "sample form" in name:
                continue
            for dtype in (torch.bfloat16, torch.float16):
                errors = [0.0, 0.0, 0.0]
                for half_side in (0, 1):
                    inputs = [logits.clone(), features.clone()]
                    inputs[half_side] = inputs[half_side].to(dtype)
                    leaves = [t.requires_grad_(True) for t in inputs]
                    with torch.autocast("cpu", dtype=dtype):
                        outputs = FUNCTIONS[name](*leaves, labels, envs, backend=backend)
                    # backward outside autocast, as torch recommends (the reference path's is autograd's)
                    g = torch.Generator().manual_seed(0)
                    total = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outputs)
                    grads = torch.autograd.grad(total, leaves)
                    up = [t.detach().float().requires_grad_(True) for t in leaves]
                    want, want_grads = _run(name, *up[:1], up[1], labels, envs, backend)
                    errors[0] = max(errors[0], *(_rel(a, b) for a, b in zip(outputs, want)))
                    errors[1] = max(errors[1], _rel(grads[1 - half_side], want_grads[1 - half_side]))
                    errors[2] = max(errors[2], _rel(grads[half_side], want_grads[half_side]))
                print(f"| {name} | {backend} | {str(dtype)[6:]} | {errors[0]:.1e} | {errors[1]:.1e} | {errors[2]:.1e} |")
    print()
    print("| fused head (HessianAlignmentLoss(method)(head, z, ...)) | backend | autocast | outputs | "
          "d weight, d bias | d features (float32) |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    head = torch.nn.Linear(D, C)
    for method in ("hutchinson", "hgp"):
        for backend in names[:-1]:
            for dtype in (torch.bfloat16, torch.float16):
                z = features.clone().requires_grad_(True)
                with torch.autocast("cpu", dtype=dtype):
                    out = hk.HessianAlignmentLoss(method, backend=backend)(head, z, labels, envs)
                got = torch.autograd.grad(out.total, (z, head.weight, head.bias))
                # float32 on autocast's logits: its rounding's values, the float32 linear map's derivative
                z32 = features.clone().requires_grad_(True)
                logits32 = torch.nn.functional.linear(z32, head.weight, head.bias)
                logits = logits32 + (out.logits.detach().float() - logits32).detach()
                want = hk.HessianAlignmentLoss(method, backend=backend)(logits, z32, labels, envs)
                want_grads = torch.autograd.grad(want.total, (z32, head.weight, head.bias))
                outputs = max(_rel(getattr(out, k), getattr(want, k)) for k in ("total", "erm", "hessian", "gradient"))
                params = max(_rel(got[1], want_grads[1]), _rel(got[2], want_grads[2]))
                print(f"| {method} | {backend} | {str(dtype)[6:]} | {outputs:.1e} | {params:.1e} | "
                      f"{_rel(got[0], want_grads[0]):.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
