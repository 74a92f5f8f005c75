"""Stand-in for domainbed.scripts.train: upstream's arguments and hparams resolution, a short training
loop that writes upstream's output files (results.jsonl records, done), then the resolution as JSON."""
import argparse
import json
import os
import random
import sys

import numpy as np
import torch

from domainbed import algorithms, datasets, hparams_registry
from domainbed.lib import misc


def accuracy(algorithm, x, y):
    with torch.no_grad():
        return (algorithm.predict(x).argmax(1) == y).float().mean().item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", type=str)
    parser.add_argument("--dataset", type=str, default="RotatedMNIST")
    parser.add_argument("--algorithm", type=str, default="ERM")
    parser.add_argument("--task", type=str, default="domain_generalization")
    parser.add_argument("--hparams", type=str)
    parser.add_argument("--hparams_seed", type=int, default=0)
    parser.add_argument("--trial_seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--checkpoint_freq", type=int, default=None)
    parser.add_argument("--test_envs", type=int, nargs="+", default=[0])
    parser.add_argument("--output_dir", type=str, default="train_output")
    parser.add_argument("--holdout_fraction", type=float, default=0.2)
    args = parser.parse_args()
    if args.hparams_seed == 0:
        hparams = hparams_registry.default_hparams(args.algorithm, args.dataset)
    else:
        hparams = hparams_registry.random_hparams(args.algorithm, args.dataset,
                                                  misc.seed_hash(args.hparams_seed, args.trial_seed))
    if args.hparams:
        hparams.update(json.loads(args.hparams))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    os.makedirs(args.output_dir, exist_ok=True)
    dataset = datasets.get_dataset_class(args.dataset)(args.data_dir, args.test_envs, hparams)
    splits = []  # (in, out) per environment; upstream's holdout split, without its data loaders
    for env_i, env in enumerate(dataset):
        x, y = env.tensors
        order = torch.from_numpy(np.random.RandomState(misc.seed_hash(args.trial_seed, env_i)).permutation(len(y)))
        n_out = int(len(y) * args.holdout_fraction)
        splits.append(((x[order[n_out:]], y[order[n_out:]]), (x[order[:n_out]], y[order[:n_out]])))
    train_envs = [i for i in range(len(dataset)) if i not in args.test_envs]
    cls = algorithms.get_algorithm_class(args.algorithm)
    algorithm = cls(dataset.input_shape, dataset.num_classes, len(train_envs), hparams)

    n_steps = args.steps or dataset.N_STEPS
    checkpoint_freq = args.checkpoint_freq or dataset.CHECKPOINT_FREQ
    for step in range(n_steps):
        minibatches = []
        for i in train_envs:
            x, y = splits[i][0]
            idx = torch.randint(0, len(y), (hparams["batch_size"],))
            minibatches.append((x[idx], y[idx]))
        results = {"step": step, **algorithm.update(minibatches)}
        if step % checkpoint_freq == 0 or step == n_steps - 1:
            for i, (env_in, env_out) in enumerate(splits):
                results[f"env{i}_in_acc"] = accuracy(algorithm, *env_in)
                results[f"env{i}_out_acc"] = accuracy(algorithm, *env_out)
            results.update(hparams=hparams, args=vars(args))
            with open(os.path.join(args.output_dir, "results.jsonl"), "a") as f:
                f.write(json.dumps(results, sort_keys=True) + "\n")
    with open(os.path.join(args.output_dir, "done"), "w") as f:
        f.write("done")

    print(json.dumps({"argv": sys.argv[1:], "args": vars(args), "hparams": hparams,
                      "algorithm": f"{cls.__module__}.{cls.__qualname__}"}))
