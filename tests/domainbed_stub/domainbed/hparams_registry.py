"""Stand-in for domainbed.hparams_registry, shaped like upstream's: (default, random) per name."""
import numpy as np

from domainbed.lib import misc

SMALL_IMAGES = ["Debug28", "RotatedMNIST", "ColoredMNIST"]


def _hparams(algorithm, dataset, random_seed):
    """{name: (default, random value)} for the algorithm and dataset."""
    hparams = {}

    def _hparam(name, default_val, random_val_fn):
        assert name not in hparams
        hparams[name] = (default_val, random_val_fn(np.random.RandomState(misc.seed_hash(random_seed, name))))

    _hparam("data_augmentation", True, lambda r: True)
    _hparam("resnet_dropout", 0., lambda r: r.choice([0., 0.1, 0.5]))
    _hparam("nonlinear_classifier", False, lambda r: bool(r.choice([False, False])))
    _hparam("mlp_width", 16, lambda r: int(2 ** r.uniform(3, 5)))
    _hparam("mlp_dropout", 0., lambda r: 0.)

    if algorithm == "Fishr":
        _hparam("lambda", 1000., lambda r: 10 ** r.uniform(1., 4.))
        _hparam("penalty_anneal_iters", 1500, lambda r: int(r.uniform(0., 5000.)))
        _hparam("ema", 0.95, lambda r: r.uniform(0.90, 0.99))

    if dataset in SMALL_IMAGES:
        _hparam("lr", 1e-3, lambda r: 10 ** r.uniform(-4.5, -2.5))
        _hparam("weight_decay", 0., lambda r: 0.)
        _hparam("batch_size", 64, lambda r: int(2 ** r.uniform(3, 9)))
    else:
        _hparam("lr", 5e-5, lambda r: 10 ** r.uniform(-5, -3.5))
        _hparam("weight_decay", 0., lambda r: 10 ** r.uniform(-6, -2))
        _hparam("batch_size", 32, lambda r: int(2 ** r.uniform(3, 5.5)))
    return hparams


def default_hparams(algorithm, dataset):
    return {name: default for name, (default, _) in _hparams(algorithm, dataset, 0).items()}


def random_hparams(algorithm, dataset, seed):
    return {name: drawn for name, (_, drawn) in _hparams(algorithm, dataset, seed).items()}
