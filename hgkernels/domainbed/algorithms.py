"""DomainBed algorithm classes whose penalties are computed in closed form by hgkernels.

Interface (DomainBed's ``domainbed.algorithms.Algorithm``): ``Cls(input_shape, num_classes,
num_domains, hparams)``, ``update(minibatches, unlabeled=None)`` with minibatches a list of (x, y), one
per training environment, returning a dict of Python floats, and ``predict(x)`` returning logits. The
network is DomainBed's ``networks.Featurizer(input_shape, hparams)`` followed by a linear
``networks.Classifier(featurizer.n_outputs, num_classes, False)``, as ``self.network =
nn.Sequential(featurizer, classifier)``, trained by one Adam over ``self.network`` (``lr``,
``weight_decay``). The closed forms need a linear head: ``nonlinear_classifier=True`` raises.

Objectives (E environments, L_e the mean cross-entropy of environment e's minibatch, G_e and H_e the
gradient and Hessian of L_e in the classifier's weight and bias):

- ``HGP`` (official: huawei-noah/Federated-Learning, HessianAlignment/domainbed/algorithms.py):
  ``nll = mean_e L_e``, ``loss = nll + alpha * hessian + beta * gradient`` with
  ``hessian = (1/E) sum_e ||H_e G_e - sg(H_bar G_bar)||^2`` and ``gradient = (1/E) sum_e ||G_e - sg(G_bar)||^2``
  (H_bar, G_bar those of mean_e L_e; sg = detached), i.e. `hgkernels.hgp_penalty`'s defaults.
  The official code forms H_e G_e as ``||G_e|| * grad ||G_e||`` by double backward; the same product.
- ``Hutchinson`` (same file): as HGP with the Hessian diagonals:
  ``hessian = (1/E) sum_e ||diag H_e - sg(diag H_bar)||^2``. ``hutchinson_probes = 0`` (default) is the
  exact diagonal; K > 0 the official Rademacher estimate with K probes per environment and K of its own
  for the pooled reference (official: 300), drawn from torch's global generator as the official code
  does (so DomainBed's ``--seed`` seeds them); the stream of draws is hgkernels' order, not the
  official's, so the estimates are equal in distribution, not draw for draw.
  Neither official class anneals the penalty: it is on from the first step, and so it is here.
  Returned: ``loss``, ``nll``, ``penalty`` (= alpha * hessian + beta * gradient, the official
  ``penalty``), ``hessian``, ``gradient`` (the unweighted terms).
- ``FishrClosedForm`` (upstream DomainBed's ``Fishr`` at `hgkernels.domainbed.DOMAINBED_COMMIT`,
  without BackPACK): ``nll`` the cross-entropy of all samples together, ``penalty = (1/E) sum_e
  mean_coordinates (v_e - v_bar)^2`` on the exponential moving averages (weight ``ema``, corrected by
  1/(1 - ema)) of the per-environment variances of the per-sample head gradients (`hgkernels.FishrLoss`),
  ``loss = nll + w * penalty`` with w = 0 before ``penalty_anneal_iters`` updates and ``lambda`` from
  then on; at the switch (when ``penalty_anneal_iters`` != 0) Adam is re-created, as upstream does. The
  moving average is updated by every ``update`` (as upstream), and lives in registered buffers, so it is
  in ``state_dict`` (upstream keeps it in a Python list that checkpoints lose). Returned: ``loss``,
  ``nll``, ``penalty`` (unweighted, as upstream).

``featurizer_per_env`` (hparam, default False): False runs the featurizer once on the concatenated
minibatches (upstream ERM/Fishr, the fastest: one large batch); True runs it once per environment, as
the official HGP/Hutchinson code does. They differ only for featurizers that mix the samples of a batch
(BatchNorm in training mode): then each environment's normalisation statistics come from its own
minibatch and the running statistics are updated E times per step. The default is the concatenated
pass because it is E times fewer featurizer calls and is exact for DomainBed's MLP and MNIST_CNN
(GroupNorm), and for its ResNet with ``freeze_bn``; set True to reproduce the official HGP/Hutchinson
runs with a BatchNorm featurizer.

``accumulation_steps`` (hparam, default 1): 1 is the one pass above. K > 1 splits each environment's
minibatch into K parts (``tensor_split``); micro-batch k holds part k of every environment (of one
environment with ``featurizer_per_env``) and the update back-propagates the same objective on all
of them exactly, one micro-batch at a time (`hgkernels.accumulated_backward`: the features of all
micro-batches are kept, the featurizer runs twice per sample, its activations are those of one
micro-batch). Values and the updated parameters equal K = 1 up to rounding, except for a featurizer
whose training-mode forward mixes samples (BatchNorm: per-micro-batch statistics) or draws random
numbers (dropout: masks drawn per micro-batch, replayed exactly in the second pass).

Both penalties run with ``validate=False`` (no per-step scans of the data that would synchronise a
GPU; the environment structure is still checked, and bad labels fail in the cross-entropy).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import FishrLoss, accumulated_backward, linear_head_alignment
from . import require_domainbed

_db_algorithms, networks = require_domainbed("algorithms", "networks")
Algorithm = _db_algorithms.Algorithm

__all__ = ["HGP", "Hutchinson", "FishrClosedForm"]


class _LinearHeadAlgorithm(Algorithm):
    """DomainBed's ERM network (Featurizer + linear Classifier, one Adam) plus the minibatch plumbing."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        name = type(self).__name__
        if self.hparams["nonlinear_classifier"]:
            raise ValueError(f"{name} computes its penalty in closed form for a linear classifier head; "
                             f"hparams['nonlinear_classifier'] must be False (got True)")
        self.num_domains = num_domains
        self.num_classes = num_classes
        self.featurizer = networks.Featurizer(input_shape, self.hparams)
        self.classifier = networks.Classifier(self.featurizer.n_outputs, num_classes,
                                              self.hparams["nonlinear_classifier"])
        if not isinstance(self.classifier, nn.Linear):
            raise TypeError(f"{name} needs networks.Classifier to be an nn.Linear head; "
                            f"got {type(self.classifier).__name__}")
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.accumulation_steps = self.hparams.get("accumulation_steps", 1)
        if (not isinstance(self.accumulation_steps, int) or isinstance(self.accumulation_steps, bool)
                or self.accumulation_steps < 1):
            raise ValueError(f"hparams['accumulation_steps'] must be an int >= 1 (1 = no accumulation); "
                             f"got {self.accumulation_steps!r}")
        self.register_buffer("update_count", torch.tensor([0]))
        self._init_optimizer()

    def _init_optimizer(self) -> None:
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=self.hparams["lr"],
                                          weight_decay=self.hparams["weight_decay"])

    def _features(self, minibatches) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """Features (N, D), labels (N,) of the environments in order, and their sizes."""
        sizes = [int(x.shape[0]) for x, _ in minibatches]
        labels = torch.cat([y for _, y in minibatches])
        if self.hparams.get("featurizer_per_env", False):
            features = torch.cat([self.featurizer(x) for x, _ in minibatches])
        else:
            features = self.featurizer(torch.cat([x for x, _ in minibatches]))
        return features, labels, sizes

    def _micro_batches(self, minibatches) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``accumulation_steps`` featurizer inputs (times E with ``featurizer_per_env``), and the labels
        and environment ids of their concatenation."""
        steps, per_env = self.accumulation_steps, self.hparams.get("featurizer_per_env", False)
        parts = [(x.tensor_split(steps), y.tensor_split(steps)) for x, y in minibatches]
        inputs, labels, ids = [], [], []
        for k in range(steps):
            chunk = [(e, xs[k], ys[k]) for e, (xs, ys) in enumerate(parts) if xs[k].shape[0]]
            for group in ([[c] for c in chunk] if per_env else [chunk] if chunk else []):
                inputs.append(torch.cat([x for _, x, _ in group]))
                labels += [y for _, _, y in group]
                ids += [torch.full((y.shape[0],), e, dtype=torch.int64, device=y.device) for e, _, y in group]
        return inputs, torch.cat(labels), torch.cat(ids)

    def _accumulated_step(self, inputs, objective):
        """One optimizer step on ``objective(features)`` (returning (loss, out)), back-propagated one
        micro-batch at a time; returns out."""
        self.optimizer.zero_grad()
        _, out = accumulated_backward(self.featurizer, inputs, objective)
        self.optimizer.step()
        return out

    def _features_and_logits(self, minibatches) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int]]:
        """Features (N, D), logits (N, C), labels (N,) of the environments in order, and their sizes."""
        features, labels, sizes = self._features(minibatches)
        return features, self.classifier(features), labels, sizes

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def predict(self, x):
        return self.network(x)


class _HessianAlignment(_LinearHeadAlgorithm):
    """HGP and Hutchinson: nll + alpha * hessian + beta * gradient, penalty on from the first step.

    The classifier, the nll (mean_e L_e, the official ``train_nll``) and the penalty are one fused
    autograd Function (`hgkernels.linear_head_alignment`), so the features' gradient is written once."""

    method = ""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.penalty_alpha = hparams["penalty_alpha"]
        self.penalty_beta = hparams["penalty_beta"]

    def _penalty_options(self) -> Dict[str, object]:
        return {}

    def update(self, minibatches, unlabeled=None) -> Dict[str, float]:
        def objective(features, labels, envs, **extra):
            out = linear_head_alignment(features, self.classifier.weight, self.classifier.bias, labels, envs,
                                        method=self.method, alpha=self.penalty_alpha, beta=self.penalty_beta,
                                        validate=False, **extra, **self._penalty_options())
            return out.total, out

        if self.accumulation_steps > 1:
            inputs, labels, ids = self._micro_batches(minibatches)
            out = self._accumulated_step(inputs, lambda z: objective(z, labels, ids, num_envs=len(minibatches)))
        else:
            out = objective(*self._features(minibatches))[1]
            self._step(out.total)
        self.update_count += 1
        hessian, gradient = out.hessian.item(), out.gradient.item()
        return {"loss": out.total.item(), "nll": out.erm.item(),
                "penalty": self.penalty_alpha * hessian + self.penalty_beta * gradient,
                "hessian": hessian, "gradient": gradient}


class HGP(_HessianAlignment):
    """Hessian-gradient-product alignment (Hemati et al., ICCV 2023), closed form (`hgkernels.hgp_penalty`)."""

    method = "hgp"


class Hutchinson(_HessianAlignment):
    """Hessian-diagonal alignment (Hemati et al., ICCV 2023), closed form (`hgkernels.hutchinson_penalty`).

    ``hparams["hutchinson_probes"]``: 0 (default) exact diagonal; K > 0 the official K-probe estimator.
    """

    method = "hutchinson"

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.num_probes = int(hparams.get("hutchinson_probes", 0))
        if self.num_probes < 0:
            raise ValueError(f"hparams['hutchinson_probes'] must be >= 0 (0 = exact diagonal); got {self.num_probes}")

    def _penalty_options(self) -> Dict[str, object]:
        return {} if self.num_probes == 0 else {"estimator": "hutchinson", "num_probes": self.num_probes}


class FishrClosedForm(_LinearHeadAlgorithm):
    """Upstream DomainBed's Fishr (Rame et al., ICML 2022) with the closed-form variances of `hgkernels.FishrLoss`."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.fishr = FishrLoss(num_domains, num_classes, self.featurizer.n_outputs, ema=hparams["ema"],
                               bias=True, validate=False)

    def update(self, minibatches, unlabeled=None) -> Dict[str, float]:
        if len(minibatches) != self.num_domains:
            raise ValueError(f"FishrClosedForm was built for {self.num_domains} training environments; "
                             f"update got {len(minibatches)} minibatches")
        penalty_weight = 0
        if self.update_count >= self.hparams["penalty_anneal_iters"]:
            penalty_weight = self.hparams["lambda"]
            if self.update_count == self.hparams["penalty_anneal_iters"] != 0:
                # as upstream (and IRM, VREx): a fresh Adam for the jump in gradient magnitudes
                self._init_optimizer()
        self.update_count += 1

        def objective(features, logits, labels, envs):
            # upstream updates the moving average on every update, whatever the module's mode
            was_training = self.fishr.training
            self.fishr.train(True)
            try:
                penalty = self.fishr(logits, features, labels, envs)
            finally:
                self.fishr.train(was_training)
            nll = F.cross_entropy(logits, labels)
            loss = nll + penalty_weight * penalty
            return loss, (loss, nll, penalty)

        if self.accumulation_steps > 1:
            inputs, labels, ids = self._micro_batches(minibatches)
            loss, nll, penalty = self._accumulated_step(
                inputs, lambda z: objective(z, self.classifier(z), labels, ids))
        else:
            loss, nll, penalty = objective(*self._features_and_logits(minibatches))[1]
            self._step(loss)
        return {"loss": loss.item(), "nll": nll.item(), "penalty": penalty.item()}
