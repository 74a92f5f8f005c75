"""The DomainBed recipe of docs/domainbed.md: the sweep entry, collect_results on its output, and the
messages for a missing or mismatched torchvision.

The sweep and train commands run as subprocesses on the stand-in DomainBed (tests/domainbed_stub/),
whose sweep builds its jobs' commands exactly as upstream's does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hgkernels.domainbed import requirements
from hgkernels.domainbed import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = os.path.join(ROOT, "tests", "domainbed_stub")
DOC = os.path.join(ROOT, "docs", "domainbed.md")


def _run(args, pythonpath, timeout=240):
    # the jobs run `python -m ...` through the shell, as upstream's launchers do: make that this Python
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _sweep_args(tmp_path, launcher, command="launch"):
    return ["-m", "hgkernels.domainbed.sweep", command, "--datasets", "Debug28", "--algorithms", "HGP",
            "--n_hparams", "1", "--n_trials", "1", "--single_test_envs", "--steps", "2",
            "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "sweep"),
            "--command_launcher", launcher, "--skip_confirmation"]


# ---------------------------------------------------------------- the sweep entry

def test_retarget_replaces_only_the_train_module():
    upstream = "python -m domainbed.scripts.train --algorithm HGP --test_envs 0 1"
    ours = "python -m hgkernels.domainbed.train --algorithm HGP --test_envs 0 1"
    assert sweep.retarget(upstream) == ours and sweep.retarget(ours) == ours
    for other in ("python3 -m domainbed.scripts.train --x 1", "python -m domainbed.scripts.train_autolr --x 1"):
        with pytest.raises(RuntimeError, match="expected DomainBed's sweep commands"):
            sweep.retarget(other)


def test_patch_launchers_wraps_each_launcher_once():
    seen = []
    registry = {"a": seen.extend, "b": lambda commands: seen.append(("b", commands))}
    sweep.patch_launchers(registry)
    wrapped = dict(registry)
    sweep.patch_launchers(registry)
    assert registry == wrapped
    registry["a"](["python -m domainbed.scripts.train --k 1"])
    registry["b"](["python -m domainbed.scripts.train --k 2"])
    assert seen == ["python -m hgkernels.domainbed.train --k 1", ("b", ["python -m hgkernels.domainbed.train --k 2"])]


def test_sweep_entry_launches_our_train_entry(tmp_path):
    out = _run(_sweep_args(tmp_path, "dummy"), [ROOT, STUB])
    assert out.returncode == 0, out.stderr
    commands = [line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("Dummy launcher: ")]
    assert len(commands) == 3  # Debug28's three test environments
    for env, command in enumerate(sorted(commands, key=lambda c: c.split("--test_envs ")[1])):
        assert command.startswith("python -m hgkernels.domainbed.train --algorithm HGP "), command
        assert f"--test_envs {env} " in command and "--steps 2" in command
    assert "domainbed.scripts.train" not in out.stdout


@pytest.mark.slow
def test_sweep_local_launcher_then_collect_results(tmp_path):
    out = _run(_sweep_args(tmp_path, "local"), [ROOT, STUB])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    jobs = sorted(os.listdir(sweep_dir))
    assert len(jobs) == 3 and all((sweep_dir / j / "done").exists() for j in jobs)
    records = [json.loads(line) for j in jobs for line in open(sweep_dir / j / "results.jsonl")]
    # hgkernels' HGP ran in each job: its hparams and its update's terms are in the records
    assert {r["args"]["algorithm"] for r in records} == {"HGP"}
    assert all(r["hparams"]["penalty_alpha"] == 1e-4 and "hessian" in r for r in records)
    assert sorted(r["args"]["test_envs"][0] for r in records if r["step"] == 1) == [0, 1, 2]

    # DomainBed's own collect_results reads the sweep: our algorithms need no registration there
    out = _run(["-m", "domainbed.scripts.collect_results", "--input_dir", str(sweep_dir)], [STUB])
    assert out.returncode == 0, out.stderr
    assert f"Total records: {len(records)}" in out.stdout
    row = [line for line in out.stdout.splitlines() if line.startswith("HGP ")]
    assert len(row) == 1 and len(row[0].split()) == 4 and "X" not in row[0].split(), out.stdout
    assert (sweep_dir / "results.txt").exists()

    # delete_incomplete through the same entry removes a job that did not finish, and only it
    (sweep_dir / jobs[0] / "done").unlink()
    out = _run(_sweep_args(tmp_path, "local", "delete_incomplete"), [ROOT, STUB])
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(sweep_dir)) == sorted(jobs[1:] + ["results.txt"])


# ---------------------------------------------------------------- missing or mismatched dependencies

def _fake_domainbed(tmp_path, algorithms_body):
    """A `domainbed` package whose algorithms module fails to import as a DomainBed without its requirements."""
    pkg = tmp_path / "fake" / "domainbed"
    (pkg / "scripts").mkdir(parents=True)
    for f in ("__init__.py", "scripts/__init__.py", "hparams_registry.py"):
        (pkg / f).write_text("")
    (pkg / "algorithms.py").write_text(algorithms_body)
    return str(tmp_path / "fake")


@pytest.mark.parametrize("entry", ["train", "sweep"])
def test_missing_torchvision_says_what_to_install(tmp_path, entry):
    # what `import torchvision.models` raises where torchvision is not installed
    fake = _fake_domainbed(tmp_path, "raise ModuleNotFoundError(\"No module named 'torchvision'\", name='torchvision')\n")
    out = _run(["-m", f"hgkernels.domainbed.{entry}", "--dataset", "Debug28"], [ROOT, fake])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"hgkernels.domainbed.{entry}: DomainBed needs torchvision"), out.stderr
    assert requirements.PIN_TORCH in out.stderr
    assert requirements.torchvision_install_command(torch.__version__) in out.stderr
    assert "pip install -c torch-pin.txt wilds timm gdown" in out.stderr and "docs/domainbed.md" in out.stderr


def test_missing_timm_says_what_to_install(tmp_path):
    fake = _fake_domainbed(tmp_path, "raise ModuleNotFoundError(\"No module named 'timm'\", name='timm')\n")
    out = _run(["-m", "hgkernels.domainbed.train"], [ROOT, fake])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "DomainBed imports 'timm'" in out.stderr and "pip install -c torch-pin.txt timm" in out.stderr


def test_torchvision_of_another_build_says_to_replace_it(tmp_path):
    # what importing a CUDA torchvision raises on a CPU torch
    fake = _fake_domainbed(tmp_path, "raise RuntimeError('operator torchvision::nms does not exist')\n")
    out = _run(["-m", "hgkernels.domainbed.train"], [ROOT, fake])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "does not load with torch" in out.stderr and "pip uninstall -y torchvision" in out.stderr
    assert requirements.torchvision_install_command(torch.__version__) in out.stderr


def test_other_import_errors_are_not_rewritten(tmp_path):
    fake = _fake_domainbed(tmp_path, "raise ModuleNotFoundError(\"No module named 'somethingelse'\", name='somethingelse')\n")
    out = _run(["-m", "hgkernels.domainbed.train"], [ROOT, fake])
    assert out.returncode == 1 and "No module named 'somethingelse'" in out.stderr
    assert "pip install" not in out.stderr


@pytest.mark.parametrize("torch_version,command", [
    ("2.13.0+cpu", 'pip install "torchvision==0.28.*" -c torch-pin.txt --index-url https://download.pytorch.org/whl/cpu'),
    ("2.13.0", 'pip install "torchvision==0.28.*" -c torch-pin.txt'),
    ("2.14.1+cu126", 'pip install "torchvision==0.29.*" -c torch-pin.txt --index-url https://download.pytorch.org/whl/cu126'),
    ("2.0.1", 'pip install "torchvision==0.15.*" -c torch-pin.txt'),
    ("1.13.1+cpu", "pip install torchvision -c torch-pin.txt --index-url https://download.pytorch.org/whl/cpu"),
])
def test_torchvision_install_command(torch_version, command):
    assert requirements.torchvision_install_command(torch_version) == command


def test_doc_shows_the_commands_the_messages_give():
    with open(DOC) as f:
        doc = f.read()
    for line in (requirements.PIN_TORCH, requirements.torchvision_install_command("2.13.0+cpu"),
                 requirements.torchvision_install_command("2.13.0"), "pip install -c torch-pin.txt wilds timm gdown",
                 "python -m hgkernels.domainbed.sweep launch", "python -m domainbed.scripts.collect_results",
                 "python -m domainbed.scripts.download", "download_pacs('./data')",
                 '--hparams \'{"batch_size": 8}\''):
        assert line in doc, line
