"""Stand-in for domainbed.scripts.collect_results: reads every <input_dir>/*/results.jsonl as upstream does and
prints, into results.txt too, the test accuracy per algorithm and test environment under the
training-domain validation selection (upstream prints this and two more selection methods)."""
import argparse
import collections
import json
import os

import numpy as np

from domainbed import algorithms, datasets


def load_records(path):
    records = []
    for subdir in sorted(os.listdir(path)):
        results_path = os.path.join(path, subdir, "results.jsonl")
        if os.path.exists(results_path):
            with open(results_path) as f:
                records += [json.loads(line) for line in f if line.strip()]
    return records


def training_domain_selection(records):
    """Test-env in-accuracy of the checkpoint and hparams with the best mean train-env out-accuracy."""
    test_env = records[0]["args"]["test_envs"][0]
    train_envs = [i for i in range(datasets.num_environments(records[0]["args"]["dataset"])) if i != test_env]
    best = max(records, key=lambda r: np.mean([r[f"env{i}_out_acc"] for i in train_envs]))
    return best[f"env{test_env}_in_acc"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--input_dir", type=str, required=True)
    args = parser.parse_args()
    records = load_records(args.input_dir)
    groups = collections.defaultdict(list)
    for r in records:
        if len(r["args"]["test_envs"]) == 1:
            groups[r["args"]["dataset"], r["args"]["algorithm"], r["args"]["test_envs"][0]].append(r)
    names = sorted({a for _, a, _ in groups}, key=lambda a: (a not in algorithms.ALGORITHMS, a))
    lines = [f"Total records: {len(records)}", "-------- model selection method: training-domain validation set"]
    for dataset in sorted({d for d, _, _ in groups}):
        envs = range(datasets.num_environments(dataset))
        lines.append(f"Dataset: {dataset}  " + "  ".join(f"env{e}" for e in envs))
        for name in names:
            accs = [groups.get((dataset, name, e)) for e in envs]
            cells = ["X" if g is None else f"{100 * training_domain_selection(g):.1f}" for g in accs]
            lines.append(f"{name:20s} " + "  ".join(cells))
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.input_dir, "results.txt"), "w") as f:
        f.write(text + "\n")
