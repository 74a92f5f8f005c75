"""Stand-in for domainbed.scripts.train: resolves what upstream's script resolves and prints it as JSON."""
import argparse
import json
import sys

from domainbed import algorithms, hparams_registry
from domainbed.lib import misc

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", type=str)
    parser.add_argument("--dataset", type=str, default="RotatedMNIST")
    parser.add_argument("--algorithm", type=str, default="ERM")
    parser.add_argument("--hparams", type=str)
    parser.add_argument("--hparams_seed", type=int, default=0)
    parser.add_argument("--trial_seed", type=int, default=0)
    parser.add_argument("--test_envs", type=int, nargs="+", default=[0])
    parser.add_argument("--output_dir", type=str, default="train_output")
    args = parser.parse_args()
    if args.hparams_seed == 0:
        hparams = hparams_registry.default_hparams(args.algorithm, args.dataset)
    else:
        hparams = hparams_registry.random_hparams(args.algorithm, args.dataset,
                                                  misc.seed_hash(args.hparams_seed, args.trial_seed))
    if args.hparams:
        hparams.update(json.loads(args.hparams))
    cls = algorithms.get_algorithm_class(args.algorithm)
    print(json.dumps({"argv": sys.argv[1:], "args": vars(args), "hparams": hparams,
                      "algorithm": f"{cls.__module__}.{cls.__qualname__}"}))
