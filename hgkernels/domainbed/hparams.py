"""Hyperparameters of hgkernels' DomainBed algorithms, and the hook into DomainBed's registry.

Each entry is ``(name, default, random_fn)`` as in DomainBed's ``hparams_registry._hparams``: the
random value is ``random_fn(np.random.RandomState(misc.seed_hash(random_seed, name)))``, so a name's
random value depends only on the seed and the name, exactly as upstream draws it.

- HGP and Hutchinson: ``penalty_alpha`` (Hessian term) and ``penalty_beta`` (gradient term) with the
  official defaults and random-search ranges of huawei-noah/Federated-Learning,
  HessianAlignment/domainbed/hparams_registry.py (argument order of ``r.uniform`` kept, so the random
  values are the official ones). The official Hutchinson ranges, 10^[1, 4] and 10^[2, 6], lie far
  above its defaults (1e-3, 5e-3); they are reproduced as published.
- Hutchinson: ``hutchinson_probes``: 0 (default) = the exact Hessian diagonal (the estimator's
  expectation); K > 0 = the official Rademacher estimator with K probes (the official code: 300).
- FishrClosedForm: upstream DomainBed's Fishr hparams ``lambda``, ``penalty_anneal_iters``, ``ema``.
- CMA (Chen et al., UAI 2025; its DomainBed fork chenyuen0103/DomainBed, ``hparams_registry.py``):
  ``grad_alpha`` (gradient term) 5000 and ``hess_beta`` (Hessian term) 1000, both 10^U(1, 4); on
  datasets whose DomainBed featurizer is a ResNet (all but `SMALL_IMAGES`) both the defaults and the
  random values are divided by (2048/384) and (2048/384)^2, as the fork does for ``model_type ==
  "ResNet"`` (its features are 2048 wide instead of ViT-S's 384). ``penalty_anneal_iters`` 0, random
  from {500, 1500, 2500, 3500, 4500}: the fork draws it from NumPy's global generator (not
  reproducible from the seed); here from the seeded ``RandomState`` like every other entry. The
  options that reproduce the fork's quirks (``featurizer_passes``, ``moment_diagnostics``,
  ``l1_weight``, ``l1_min_classes``) have the fork's behaviour as default and random value.
- HGP, Hutchinson, FishrClosedForm: ``featurizer_per_env`` (default False): one featurizer pass over the concatenated
  minibatches (upstream ERM's and Fishr's behaviour, and the fastest) instead of one pass per
  environment (the official HGP/Hutchinson code). The two differ only when the featurizer mixes
  samples of a batch, i.e. BatchNorm in training mode (DomainBed's ResNet unless ``freeze_bn``, the
  CIFAR Wide-ResNet); MNIST_CNN (GroupNorm) and the MLP give the same result up to rounding.
- All three: ``accumulation_steps`` (default 1): K > 1 splits each environment's minibatch into K
  micro-batches and computes the same update exactly at one micro-batch's activation memory
  (`hgkernels.accumulated_backward`; see `hgkernels.domainbed.algorithms`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

HParamSpec = Tuple[str, object, Callable[[np.random.RandomState], object]]

_FEATURIZER_PER_ENV: HParamSpec = ("featurizer_per_env", False, lambda r: False)
_ACCUMULATION_STEPS: HParamSpec = ("accumulation_steps", 1, lambda r: 1)

#: DomainBed's datasets of small images (MNIST CNN / MLP featurizers); the others get a ResNet
SMALL_IMAGES = ("Debug28", "RotatedMNIST", "ColoredMNIST")

#: CMA's divisors of its weights for a ResNet featurizer (2048 features instead of ViT-S's 384)
CMA_RESNET_DIVISORS = {"grad_alpha": 2048 / 384, "hess_beta": (2048 / 384) ** 2}

HPARAMS: Dict[str, List[HParamSpec]] = {
    "HGP": [
        ("penalty_alpha", 0.0001, lambda r: 10 ** r.uniform(-3, -5)),
        ("penalty_beta", 0.005, lambda r: 10 ** r.uniform(-1, -3)),
        _FEATURIZER_PER_ENV,
        _ACCUMULATION_STEPS,
    ],
    "Hutchinson": [
        ("penalty_alpha", 0.001, lambda r: 10 ** r.uniform(4, 1)),
        ("penalty_beta", 0.005, lambda r: 10 ** r.uniform(6, 2)),
        ("hutchinson_probes", 0, lambda r: 0),
        _FEATURIZER_PER_ENV,
        _ACCUMULATION_STEPS,
    ],
    "FishrClosedForm": [
        ("lambda", 1000., lambda r: 10 ** r.uniform(1., 4.)),
        ("penalty_anneal_iters", 1500, lambda r: int(r.uniform(0., 5000.))),
        ("ema", 0.95, lambda r: r.uniform(0.90, 0.99)),
        _FEATURIZER_PER_ENV,
        _ACCUMULATION_STEPS,
    ],
    "CMA": [
        ("grad_alpha", 5000, lambda r: 10 ** r.uniform(1, 4)),
        ("hess_beta", 1000, lambda r: 10 ** r.uniform(1, 4)),
        ("penalty_anneal_iters", 0, lambda r: int(r.choice([500, 1500, 2500, 3500, 4500]))),
        ("featurizer_passes", 3, lambda r: 3),
        ("moment_diagnostics", True, lambda r: True),
        ("l1_weight", 1e-5, lambda r: 1e-5),
        ("l1_min_classes", 70, lambda r: 70),
    ],
}


def algorithm_hparams(algorithm: str, random_seed: int, seed_hash: Callable[..., int],
                      dataset: Optional[str] = None) -> Dict[str, tuple]:
    """``{name: (default, random value)}`` of the algorithm's own hparams ({} for other algorithms).

    ``dataset`` matters for CMA only: outside `SMALL_IMAGES` (None counts as small) its weights are
    divided by `CMA_RESNET_DIVISORS`."""
    out = {}
    for name, default, random_fn in HPARAMS.get(algorithm, ()):
        value = random_fn(np.random.RandomState(seed_hash(random_seed, name)))
        if algorithm == "CMA" and name in CMA_RESNET_DIVISORS and dataset is not None \
                and dataset not in SMALL_IMAGES:
            default, value = default / CMA_RESNET_DIVISORS[name], value / CMA_RESNET_DIVISORS[name]
        out[name] = (default, value)
    return out


def wrap_hparams_registry(registry) -> None:
    """Wrap ``registry._hparams`` (DomainBed's ``domainbed.hparams_registry``) once.

    The wrapper calls DomainBed's ``_hparams`` (generic and dataset-dependent entries) and adds, for
    hgkernels' algorithms, their own entries; a name DomainBed already defines for the algorithm (a
    DomainBed fork that ships its own HGP block) is replaced by hgkernels' entry. Other algorithms are
    untouched. Calling it again is a no-op.
    """
    original = registry._hparams
    if getattr(original, "_hgkernels_original", None) is not None:
        return
    from .requirements import require_domainbed
    (misc,) = require_domainbed("lib.misc")

    def _hparams(algorithm, dataset, random_seed):
        hparams = original(algorithm, dataset, random_seed)
        hparams.update(algorithm_hparams(algorithm, random_seed, misc.seed_hash, dataset))
        return hparams

    _hparams.__doc__ = original.__doc__
    _hparams._hgkernels_original = original
    registry._hparams = _hparams
