"""Stand-in for domainbed.scripts.sweep: upstream's arguments, its jobs (one output directory per hash of
the training arguments, and the command string built exactly as upstream's Job builds it) and its
launch / delete_incomplete commands through command_launchers.REGISTRY."""
import argparse
import copy
import hashlib
import json
import os
import shlex
import shutil

from domainbed import algorithms, command_launchers, datasets
from domainbed.lib import misc


class Job:
    NOT_LAUNCHED, INCOMPLETE, DONE = "Not launched", "Incomplete", "Done"

    def __init__(self, train_args, sweep_output_dir):
        args_hash = hashlib.md5(json.dumps(train_args, sort_keys=True).encode("utf-8")).hexdigest()
        self.output_dir = os.path.join(sweep_output_dir, args_hash)
        self.train_args = copy.deepcopy(train_args)
        self.train_args["output_dir"] = self.output_dir
        command = ["python", "-m", "domainbed.scripts.train"]
        for k, v in sorted(self.train_args.items()):
            if isinstance(v, list):
                v = " ".join(str(v_) for v_ in v)
            elif isinstance(v, str):
                v = shlex.quote(v)
            command.append(f"--{k} {v}")
        self.command_str = " ".join(command)
        if os.path.exists(os.path.join(self.output_dir, "done")):
            self.state = Job.DONE
        elif os.path.exists(self.output_dir):
            self.state = Job.INCOMPLETE
        else:
            self.state = Job.NOT_LAUNCHED


def make_args_list(args):
    args_list = []
    for trial_seed in range(args.n_trials):
        for dataset in args.datasets:
            for algorithm in args.algorithms:
                n_envs = datasets.num_environments(dataset)
                if args.single_test_envs:
                    all_test_envs = [[i] for i in range(n_envs)]
                else:
                    all_test_envs = [[i] for i in range(n_envs)] + [
                        [i, j] for i in range(n_envs) for j in range(i + 1, n_envs)]
                for test_envs in all_test_envs:
                    for hparams_seed in range(args.n_hparams_from, args.n_hparams):
                        train_args = {
                            "dataset": dataset, "algorithm": algorithm, "test_envs": test_envs,
                            "holdout_fraction": args.holdout_fraction, "hparams_seed": hparams_seed,
                            "data_dir": args.data_dir, "task": args.task, "trial_seed": trial_seed,
                            "seed": misc.seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed)}
                        if args.steps is not None:
                            train_args["steps"] = args.steps
                        if args.hparams is not None:
                            train_args["hparams"] = args.hparams
                        args_list.append(train_args)
    return args_list


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["launch", "delete_incomplete"])
    parser.add_argument("--datasets", nargs="+", type=str, default=datasets.DATASETS)
    parser.add_argument("--algorithms", nargs="+", type=str, default=algorithms.ALGORITHMS)
    parser.add_argument("--task", type=str, default="domain_generalization")
    parser.add_argument("--n_hparams_from", type=int, default=0)
    parser.add_argument("--n_hparams", type=int, default=20)
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--data_dir", type=str, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_trials", type=int, default=3)
    parser.add_argument("--command_launcher", type=str, required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--hparams", type=str, default=None)
    parser.add_argument("--holdout_fraction", type=float, default=0.2)
    parser.add_argument("--single_test_envs", action="store_true")
    parser.add_argument("--skip_confirmation", action="store_true")
    args = parser.parse_args()
    jobs = [Job(train_args, args.output_dir) for train_args in make_args_list(args)]
    if not args.skip_confirmation and input("Are you sure? (y/n) ").strip().lower()[:1] != "y":
        raise SystemExit("Nevermind!")
    if args.command == "launch":
        to_launch = [j for j in jobs if j.state == Job.NOT_LAUNCHED]
        for job in to_launch:
            os.makedirs(job.output_dir, exist_ok=True)
        command_launchers.REGISTRY[args.command_launcher]([j.command_str for j in to_launch])
        print(f"Launched {len(to_launch)} jobs!")
    else:
        to_delete = [j for j in jobs if j.state == Job.INCOMPLETE]
        for job in to_delete:
            shutil.rmtree(job.output_dir)
        print(f"Deleted {len(to_delete)} jobs!")
