"""tools/slurm/*.sbatch and tools/gpu_check.sh, without a cluster or a GPU.

Each sbatch file runs as SLURM would start it (its #SBATCH header turned into SLURM's variables), with fake
`srun`, `scontrol`, `python` and `torchrun` on PATH that record their arguments; fake srun runs its command
once per node. The recorded commands are then parsed by the parsers that would read them: Lightning's CLI and
its SLURM environment, Detectron2's argument parser, torchrun's and tools/train_mmdet.py's.
tools/gpu_check.sh: its no-GPU refusal, and on CPU what does not need a GPU (its trainer commands, its callbacks,
its report).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "tools/slurm"
JOB_ID, NODES = 4242, ("gpu07", "gpu08")
PORT = 20000 + JOB_ID % 20000

FAKE = f"""#!{sys.executable}
import json, os, subprocess, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_LOG"], "a") as log:
    print(json.dumps({{"prog": name, "argv": sys.argv[1:], "node": os.environ.get("SLURM_NODEID")}}), file=log)
if name == "scontrol":  # scontrol show hostnames LIST
    print("\\n".join({list(NODES)!r}))
elif name == "srun":  # each node's task runs the command, with its own SLURM_NODEID
    command = sys.argv[1:]
    while command[0].startswith("-"):
        command.pop(0)
    for node in range(int(os.environ["SLURM_JOB_NUM_NODES"])):
        subprocess.run(command, env={{**os.environ, "SLURM_NODEID": str(node)}}, check=True)
"""


def sbatch_header(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", path.read_text(), re.MULTILINE))


def sbatch(tmp_path: Path, name: str, *args: str) -> list[dict]:
    """Run tools/slurm/<name>.sbatch as SLURM would on len(NODES) nodes; -> the recorded calls."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    for prog in ("srun", "scontrol", "python", "torchrun"):
        (bin_dir / prog).write_text(FAKE)
        (bin_dir / prog).chmod(0o755)
    header = sbatch_header(SLURM / f"{name}.sbatch")
    slurm = {
        "SLURM_JOB_ID": str(JOB_ID),
        "SLURM_JOB_NUM_NODES": header["nodes"],
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NTASKS_PER_NODE": header["ntasks-per-node"],
        "SLURM_GPUS_ON_NODE": header["gpus-per-node"],
    }
    env = {**os.environ, **slurm, "FAKE_LOG": str(log), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    # the job starts in a folder without .venv: the script's own activation must not put the real tools first
    work = tmp_path / "job"
    work.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    subprocess.run(["bash", str(SLURM / f"{name}.sbatch"), *args], cwd=work, env=env, check=True, timeout=60)
    return [json.loads(line) for line in log.read_text().splitlines()]


def calls(recorded: list[dict], prog: str) -> list[dict]:
    return [c for c in recorded if c["prog"] == prog]


@pytest.mark.parametrize("script", [*sorted(SLURM.glob("*.sbatch")), REPO / "tools/gpu_check.sh"], ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_one_sbatch_per_engine_with_its_task_layout():
    headers = {p.stem: sbatch_header(p) for p in SLURM.glob("*.sbatch")}
    assert sorted(headers) == ["detectron2", "lightning", "mmdetection"]
    for name, h in headers.items():
        assert int(h["nodes"]) == len(NODES) and int(h["gpus-per-node"]) == 8, name
        # Lightning: one task per GPU (it needs them equal); the others: one launcher per node
        assert h["ntasks-per-node"] == (h["gpus-per-node"] if name == "lightning" else "1"), name


# --- Lightning -------------------------------------------------------------------------------------------------
def test_lightning_sbatch_runs_one_ddp_task_per_gpu_that_lightning_accepts(tmp_path, monkeypatch, capsys):
    recorded = sbatch(tmp_path, "lightning")
    (srun,) = calls(recorded, "srun")
    assert "--kill-on-bad-exit=1" in srun["argv"]  # a failing task ends the job, not an NCCL timeout later
    runs = calls(recorded, "python")
    assert [c["node"] for c in runs] == ["0", "1"] and runs[0]["argv"] == runs[1]["argv"]
    argv = runs[0]["argv"]
    assert argv[:2] == ["tools/train_imagenet.py", "fit"]
    expected = ["--trainer.strategy", "ddp", "--trainer.accelerator", "gpu", "--trainer.devices", "8"]
    expected += ["--trainer.num_nodes", "2", "--ckpt_path", "last"]
    assert argv[2:12] == expected
    assert argv[12:] == [
        *("--config", "configs/lightning/imagenet/recipe_section5.yaml"),
        *("--config", "configs/lightning/imagenet/imagenet_se_resnet50.yaml"),
        *("--data.root", "/data/imagenet", "--data.batch_size", "64"),
    ]

    # the trainer's CLI takes these arguments (paths relative to the checkout, as the job runs there)
    from classification import ImageNetDataModule, run_cli

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        run_cli(ImageNetDataModule, [*argv[1:], "--print_config"])
    assert done.value.code in (0, None)
    config = capsys.readouterr().out
    assert re.search(r"\n  num_nodes: 2\n", config) and re.search(r"\n  devices: 8\n", config)
    assert "ckpt_path: last" in config and "batch_size: 64" in config

    # and Lightning's SLURM environment, as srun starts task 9 of 16 (node 1, its GPU 1), agrees
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    slurm = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    slurm |= {"SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "job", "SLURM_NODELIST": "gpu[07-08]"}
    for key, value in {**slurm, "SLURM_JOB_ID": str(JOB_ID)}.items():
        monkeypatch.setenv(key, value)
    environment = SLURMEnvironment()
    assert SLURMEnvironment.detect()
    environment.validate_settings(num_devices=8, num_nodes=2)  # raises when tasks != devices x nodes
    assert (environment.world_size(), environment.global_rank(), environment.node_rank()) == (16, 9, 1)
    assert environment.local_rank() == 1 and environment.main_address == "gpu07"


def test_lightning_sbatch_passes_another_trainer_and_resumes_only_fit(tmp_path):
    args = ["tools/train_places365.py", "validate", "--config", "c.yaml", "--ckpt_path", "best.ckpt"]
    (run, _) = calls(sbatch(tmp_path, "lightning", *args), "python")
    assert run["argv"][:2] == args[:2] and run["argv"][-4:] == args[2:]
    assert "last" not in run["argv"]


# --- Detectron2 --------------------------------------------------------------------------------------------------
def test_detectron2_sbatch_launches_each_node_with_its_machine_rank(tmp_path):
    runs = calls(sbatch(tmp_path, "detectron2"), "python")
    assert [c["node"] for c in runs] == ["0", "1"]
    detectron2 = pytest.importorskip("detectron2.engine", reason="Detectron2 is not installed")
    for rank, run in enumerate(runs):
        assert run["argv"][0] == "tools/train_net.py"
        parser = detectron2.default_argument_parser()
        parser.add_argument("--config", dest="config_file")  # tools/train_net.py's alias
        args = parser.parse_args(run["argv"][1:])
        assert (args.num_gpus, args.num_machines, args.machine_rank) == (8, 2, rank)
        assert args.dist_url == f"tcp://gpu07:{PORT}" and args.resume and not args.eval_only
        assert args.config_file == "configs/detectron2/faster_rcnn_se_r50.yaml"
        assert args.opts == ["MODEL.WEIGHTS", "pretrained/se_resnet50.safetensors"]
    evaluate = ["--config", "c.yaml", "--eval-only", "MODEL.WEIGHTS", "w.pth"]
    (run, _) = calls(sbatch(tmp_path, "detectron2", *evaluate), "python")
    assert "--resume" not in run["argv"] and run["argv"][-5:] == evaluate


# --- MMDetection -------------------------------------------------------------------------------------------------
def test_mmdetection_sbatch_runs_torchrun_per_node_with_the_pytorch_launcher(tmp_path, monkeypatch):
    from torch.distributed.run import get_args_parser

    from tools.train_mmdet import parse_args

    runs = calls(sbatch(tmp_path, "mmdetection"), "torchrun")
    assert [c["node"] for c in runs] == ["0", "1"]
    for rank, run in enumerate(runs):
        args = get_args_parser().parse_args(run["argv"])
        assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", rank, "8")
        assert (args.master_addr, args.master_port) == ("gpu07", PORT)
        assert args.training_script == "tools/train_mmdet.py"
        config, *rest = args.training_script_args
        assert config == "configs/mmdet/faster-rcnn_se-r50_fpn_2x_coco.py"
        # what torchrun sets in each process it starts (the first of this node's 8)
        world = {"RANK": str(rank * 8), "WORLD_SIZE": "16", "MASTER_ADDR": args.master_addr, "LOCAL_RANK": "0"}
        for name, value in world.items():
            monkeypatch.setenv(name, value)
        mmdet = parse_args([str(REPO / config), *rest])
        assert mmdet.launcher == "pytorch" and mmdet.resume is True and mmdet.auto_scale_lr
    weights = ["c.py", "--checkpoint", "w.pth"]
    (run, _) = calls(sbatch(tmp_path, "mmdetection", *weights), "torchrun")
    assert "--resume" not in run["argv"] and run["argv"][-5:] == [*weights, "--launcher", "pytorch"]


# --- tools/gpu_check.sh ------------------------------------------------------------------------------------------
def test_gpu_check_refuses_at_once_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "tools/gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("error: no CUDA GPU is visible to torch (torch.cuda.is_available() is False;")
    assert not (tmp_path / "out").exists() and time.monotonic() - start < 60  # before any step
    usage = subprocess.run(["bash", str(REPO / "tools/gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: tools/gpu_check.sh OUT")


def test_gpu_check_trainer_commands_parse_and_its_callbacks_run_on_cpu(tmp_path, monkeypatch, capsys, one_thread):
    from cifar.data import CIFARDataModule
    from classification import ImageNetDataModule, run_cli
    from places365 import Places365DataModule
    from tools import gpu_check

    monkeypatch.chdir(REPO)
    steps = gpu_check.all_steps(tmp_path)
    assert [s["name"] for s in steps] == [
        "cifar bf16-mixed", "places365 bf16-mixed", "imagenet bf16-mixed", "detectron2 smoke", "mmdetection smoke",
        "benchmark", "cifar 16-mixed", "places365 16-mixed", "imagenet 16-mixed", "benchmark compile",
    ]  # fmt: skip
    modules = {"train_cifar": CIFARDataModule, "train_places365": Places365DataModule}
    modules["train_imagenet"] = ImageNetDataModule
    for command in (s["command"] for s in steps if Path(s["command"][1]).stem in modules):
        with pytest.raises(SystemExit):  # every argument, the callbacks' class paths too, is accepted
            run_cli(modules[Path(command[1]).stem], [*command[2:], "--print_config"])
        assert "tools.gpu_check.Throughput" in capsys.readouterr().out
    # the CIFAR run itself, shortened, on the CPU: channels_last weights, images/s of each epoch
    cifar = steps[0]["command"]
    short = ["--trainer.accelerator=cpu", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"]
    short += ["--data.synthetic_train=256", "--data.synthetic_val=64", "--trainer.logger=false"]
    cli = run_cli(CIFARDataModule, [*cifar[2:], *short])
    assert cli.model.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    record = json.loads(Path(steps[0]["result"]).read_text())
    assert [e["images"] for e in record["epochs"]] == [3 * 64, 3 * 64]
    assert record["images_per_s"] == pytest.approx(3 * 64 / record["epochs"][-1]["seconds"])


def test_gpu_check_report_records_every_step(tmp_path, monkeypatch):
    from tools import gpu_check

    # the engines installed here pass the check (no skip when they can run)
    assert gpu_check.detectron2_missing() is None and gpu_check.mmdetection_missing() is None

    result = tmp_path / "result.json"
    steps = [
        {"name": "cifar bf16-mixed", "limit": 60, "result": result,
         "command": [sys.executable, "-c", f"open({str(result)!r}, 'w').write('{{\"images_per_s\": 123.0}}')"]},
        {"name": "mmdetection smoke", "limit": 60, "result": tmp_path / "none",
         "command": [sys.executable, "-c", "raise SystemExit('boom')"]},
        {"name": "benchmark", "limit": 1, "result": tmp_path / "none",
         "command": [sys.executable, "-c", "import time; time.sleep(30)"]},
        {"name": "detectron2 smoke", "limit": 60, "result": tmp_path / "none", "needs": gpu_check.detectron2_missing,
         "command": [sys.executable, "-c", "raise SystemExit('ran')"]},
    ]  # fmt: skip
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "detectron2" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(gpu_check, "all_steps", lambda out: steps)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda i: "a fake GPU")
    assert gpu_check.main([str(tmp_path / "out"), "--budget", "60"]) == 1
    report = json.loads((tmp_path / "out/gpu_check.json").read_text())
    assert report["gpu"] == "a fake GPU" and report["wall_s"] < 60
    assert [s["status"] for s in report["steps"]] == [
        "ok",
        "failed (exit 1)",
        "timeout (1 s)",
        "skipped (not installed)",
    ]
    assert report["steps"][3]["reason"] == "detectron2 is not installed (README: Detectron2)"
    assert "wall_s" not in report["steps"][3]  # not started
    assert report["steps"][0]["result"] == {"images_per_s": 123.0}
    assert "boom" in report["steps"][1]["output_tail"]
    assert (tmp_path / "out/gpu_check.png").stat().st_size > 0
    # what no longer fits the budget is recorded, not run
    assert gpu_check.main([str(tmp_path / "out2"), "--budget", "5"]) == 1
    report = json.loads((tmp_path / "out2/gpu_check.json").read_text())
    assert {s["status"] for s in report["steps"]} == {"skipped (time budget)"}
