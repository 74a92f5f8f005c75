"""DomainBed algorithm classes whose penalties are computed in closed form by hgkernels: HGP,
Hutchinson, FishrClosedForm, and CMA (its own docstring: a bias-free head on [1, features]).

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

from .. import FishrLoss, accumulated_backward, full_hessian_penalty, linear_head_alignment
from .requirements import require_domainbed

_db_algorithms, networks = require_domainbed("algorithms", "networks")
Algorithm = _db_algorithms.Algorithm

__all__ = ["HGP", "Hutchinson", "FishrClosedForm", "CMA"]


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
        self.classifier = self._make_classifier(self.featurizer.n_outputs, num_classes)
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

    def _make_classifier(self, num_features: int, num_classes: int) -> nn.Module:
        return networks.Classifier(num_features, num_classes, self.hparams["nonlinear_classifier"])

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


def _with_ones(features: torch.Tensor) -> torch.Tensor:
    """CMA's head input: a column of ones (its bias) before the features."""
    return torch.cat([features.new_ones(features.shape[0], 1), features], 1)


def moment_differences(features: torch.Tensor, sizes: List[int]) -> Tuple[float, float]:
    """CMA's logged diagnostics: over all pairs of environments, the mean Euclidean distance between
    their feature means and the mean Frobenius distance between their feature covariances (unbiased,
    in float64 as NumPy's ``np.cov``; zero for an environment of one sample). (0, 0) for one environment."""
    means, covs = [], []
    for f in features.detach().split(sizes):
        means.append(f.mean(0))
        f64 = f.double()
        covs.append(torch.cov(f64.T) if f.shape[0] > 1 else f64.new_zeros(f.shape[1], f.shape[1]))
    mean_diffs, cov_diffs = [], []
    for i in range(len(sizes)):
        for j in range(i + 1, len(sizes)):
            mean_diffs.append(torch.linalg.vector_norm(means[i] - means[j]).item())
            cov_diffs.append(torch.linalg.matrix_norm(covs[i] - covs[j]).item())
    if not mean_diffs:
        return 0.0, 0.0
    return sum(mean_diffs) / len(mean_diffs), sum(cov_diffs) / len(cov_diffs)


class CMA(_LinearHeadAlgorithm):
    """CMA, closed-form moment alignment (Chen et al., UAI 2025), exactly, at the cost of the Gram form.

    Reproduces the ``CMA`` class of the authors' DomainBed fork (github.com/chenyuen0103/DomainBed,
    ``domainbed/algorithms.py``, commit `hgkernels.domainbed.CMA_FORK_COMMIT`). The head is a bias-free
    ``nn.Linear(D + 1, C)`` on the features with a column of ones prepended (``predict(x) =
    classifier([1, featurizer(x)])``). With H_e, G_e the Hessian and gradient of environment e's mean
    cross-entropy in the head's (C, D + 1) weight:

        loss = CE(all logits) + grad_alpha * gradient + hess_beta * hessian  [+ l1_weight * sum |[1, z]|]
        gradient = (1/E) sum_e ||G_e - mean_f G_f||^2 / C^2,   hessian = (1/E) sum_e ||H_e - mean_f H_f||_F^2 / C^2

    (CMA scales its G_e and H_e by 1/C; nothing is detached). The fork forms each H_e, (C·(D+1))^2
    entries, below 70 classes, and from 70 on loops over pairs of environments with an O(B^2·D^2)
    einsum; here both terms are `hgkernels.full_hessian_penalty` (``bias=False``, ``detach_reference=
    False``) divided by C^2: 2N^2·D + 7N^2·C multiply-adds, four N x N matrices. The L1 term is added
    only when C >= ``l1_min_classes`` (as the fork, from the first update, before the anneal too); its
    sum includes the ones column (a constant N * l1_weight in the loss). The fork also drops all-zero
    feature columns when C >= 70: they contribute exact zeros to every term and to every gradient, so
    it changes nothing and is not done here.

    Anneal (as the fork): both weights are 0 for the first ``penalty_anneal_iters`` updates (the terms
    are then not computed and reported as 0), then ``grad_alpha`` and ``hess_beta``; at the switch
    (when ``penalty_anneal_iters`` != 0) Adam is re-created.

    Options for the fork's quirks (hparams; the defaults reproduce it):

    - ``featurizer_passes`` 3: the fork runs the featurizer three times per update (the logits, the
      diagnostics, the penalty's features); 1 runs it once. They differ only with dropout (other masks)
      or BatchNorm (running statistics updated three times). The diagnostics' pass runs without a graph.
    - ``moment_diagnostics`` True: report ``first_moment_diff`` and ``second_moment_diff``
      (`moment_differences` of the features) as the fork logs them; False reports 0 and skips the D x D
      covariances.
    - ``l1_weight`` 1e-5 and ``l1_min_classes`` 70: the fork's fixed L1 weight and threshold.

    Minibatches are (x, y) pairs (upstream DomainBed) or the fork's (x, y, env) triples; environment e is
    the e-th minibatch. The initial parameters equal the fork's for the same torch seed (the fork builds,
    and discards, a biased classifier first; so does this class). Returned: ``loss``, ``erm_loss``,
    ``grad_pen``, ``hess_pen`` (unweighted, 0 while annealed off or when their weight is 0, as the fork),
    ``l1_reg`` (unweighted by the threshold, as the fork), ``first_moment_diff``, ``second_moment_diff``.
    """

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        passes = int(hparams.get("featurizer_passes", 3))
        if passes not in (1, 3):
            raise ValueError(f"hparams['featurizer_passes'] must be 3 (as CMA) or 1; got {passes}")
        for key in ("grad_alpha", "hess_beta", "l1_weight"):
            if key in hparams and not hparams[key] >= 0:
                raise ValueError(f"hparams[{key!r}] must be >= 0; got {hparams[key]}")
        if hparams.get("accumulation_steps", 1) != 1:
            raise ValueError("CMA takes no hparams['accumulation_steps'] (its update is one pass, as the fork's); "
                             f"got {hparams['accumulation_steps']!r}")
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.grad_alpha = hparams["grad_alpha"]
        self.hess_beta = hparams["hess_beta"]
        self.penalty_anneal_iters = hparams["penalty_anneal_iters"]
        self.featurizer_passes = passes
        self.moment_diagnostics = bool(hparams.get("moment_diagnostics", True))
        self.l1_weight = float(hparams.get("l1_weight", 1e-5))
        self.l1_min_classes = int(hparams.get("l1_min_classes", 70))

    def _make_classifier(self, num_features: int, num_classes: int) -> nn.Module:
        # the fork's CMA subclasses ERM, which builds a biased classifier before CMA replaces it: built
        # and discarded here too, so that the same torch seed gives the fork's initial head
        networks.Classifier(num_features, num_classes, self.hparams["nonlinear_classifier"])
        return nn.Linear(num_features + 1, num_classes, bias=False)

    def predict(self, x):
        return self.classifier(_with_ones(self.featurizer(x)))

    def update(self, minibatches, unlabeled=None) -> Dict[str, float]:
        for mb in minibatches:
            if not isinstance(mb, (tuple, list)) or len(mb) not in (2, 3):
                raise ValueError("CMA.update takes a list of (x, y) or (x, y, env) minibatches, one per "
                                 f"training environment; got an element of type {type(mb).__name__}")
        all_x = torch.cat([mb[0] for mb in minibatches])
        labels = torch.cat([mb[1] for mb in minibatches])
        sizes = [int(mb[0].shape[0]) for mb in minibatches]

        first = self.featurizer(all_x)
        logits = self.classifier(_with_ones(first))
        if self.featurizer_passes == 3:
            with torch.no_grad():
                second = self.featurizer(all_x)
        else:
            second = first
        mean_diff, cov_diff = moment_differences(second, sizes) if self.moment_diagnostics else (0.0, 0.0)

        alpha = beta = 0
        if self.update_count >= self.penalty_anneal_iters:
            alpha, beta = self.grad_alpha, self.hess_beta
            if self.update_count == self.penalty_anneal_iters != 0:
                self._init_optimizer()  # as the fork (and IRM, VREx): a fresh Adam at the switch

        x = _with_ones(self.featurizer(all_x) if self.featurizer_passes == 3 else first)
        erm = F.cross_entropy(logits, labels)
        l1 = x.abs().sum() * self.l1_weight
        loss = erm
        grad_pen = hess_pen = 0.0
        if alpha != 0 or beta != 0:
            pen = full_hessian_penalty(logits, x, labels, sizes, bias=False, detach_reference=False,
                                       validate=False)
            scale = 1.0 / self.num_classes ** 2
            if alpha != 0:
                loss = loss + alpha * (pen.gradient * scale)
                grad_pen = pen.gradient.detach() * scale
            if beta != 0:
                loss = loss + beta * (pen.hessian * scale)
                hess_pen = pen.hessian.detach() * scale
        if self.num_classes >= self.l1_min_classes:
            loss = loss + l1
        self._step(loss)
        self.update_count += 1
        value = lambda t: t.item() if isinstance(t, torch.Tensor) else float(t)  # noqa: E731
        return {"loss": loss.item(), "erm_loss": erm.item(), "grad_pen": value(grad_pen),
                "hess_pen": value(hess_pen), "l1_reg": l1.item(),
                "first_moment_diff": mean_diff, "second_moment_diff": cov_diff}
