"""Data-parallel calibration: torchrun with gloo on CPU gives the single-process recipe, byte for byte."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from recipe_compiler.cli import compile_main
from recipe_compiler.distributed import SINGLE, Sharding, batches_of, env_world, rank_device

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per torchrun launch; a healthy one takes ~10 s on 2 CPU cores

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "recipe_compiler.cli", *args,
    ]
    try:
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s (a rank hangs?): {' '.join(command)}")


def _single(capsys, args: list[str]) -> int:
    code = compile_main(args)
    capsys.readouterr()
    return code


# ------------------------------------------------------------------------------ the helper itself
def test_single_process_sharding_runs_every_batch_and_keeps_the_order():
    batches = list(batches_of(list(range(10)), 4))
    assert [(start, list(batch)) for start, batch in batches] == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7]), (8, [8, 9])]
    assert SINGLE.my_batches(batches) == list(enumerate(batches))
    assert SINGLE.gather([(2, "c"), (0, "a"), (1, "b")]) == ["a", "b", "c"]
    assert SINGLE.share(10, 4) == 10
    SINGLE.agree(None)
    with pytest.raises(KeyError):
        SINGLE.agree(KeyError("bad"))


def test_ranks_split_whole_batches_round_robin_and_cover_each_once():
    batches = list(batches_of(list(range(11)), 3))  # 3, 3, 3, 2
    ranks = [Sharding(rank=r, world=3) for r in range(3)]
    mine = [[index for index, _ in s.my_batches(batches)] for s in ranks]
    assert mine == [[0, 3], [1], [2]]
    assert [s.share(11, 3) for s in ranks] == [5, 3, 3]
    assert Sharding(rank=2, world=5).my_batches(batches[:2]) == []  # more ranks than batches: some idle


def test_torchrun_environment_and_per_rank_device(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert env_world() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (3, 4, 1)
    assert rank_device("cuda", 1, 4) == "cuda:1" and rank_device("cpu", 1, 4) == "cpu"
    assert rank_device("cuda", 0, 1) == "cuda"


# ------------------------------------------------------------------------------ torchrun end to end
@needs_gloo
@pytest.mark.parametrize(
    "extra",
    [
        ["--budget", "0.5", "--samples", "4"],  # 2 batches of 2: one per rank
        ["--budget", "0.6", "--samples", "5", "--search", "fitprune"],  # 2, 2, 1: rank 0 runs batches 0 and 2
    ],
    ids=["optimal", "fitprune-uneven"],
)
def test_torchrun_two_gloo_ranks_write_the_single_process_recipe_byte_for_byte(tmp_path, capsys, extra):
    common = ["--model", "tiny-llava", "--batch-size", "2", "--quiet", *extra]
    parallel, single = tmp_path / "A.safetensors", tmp_path / "B.safetensors"
    run = _torchrun(common + ["-o", str(parallel), "--save-stats", str(tmp_path / "SA.safetensors")])
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [line for line in run.stdout.splitlines() if line.startswith("budget ")]
    assert len(summaries) == 1, run.stdout  # only rank 0 reports
    assert _single(capsys, common + ["-o", str(single), "--save-stats", str(tmp_path / "SB.safetensors")]) == 0
    assert parallel.read_bytes() == single.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.safetensors", "B.safetensors", "SA.safetensors", "SB.safetensors"]

    from recipe_compiler.statistics import load_statistics

    a, b = load_statistics(tmp_path / "SA.safetensors"), load_statistics(tmp_path / "SB.safetensors")
    for name in ("cross", "self_attn", "last", "n_visual", "n_text", "n_tokens"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name


@needs_gloo
def test_torchrun_bad_calibration_fails_every_rank_with_one_line_and_no_file(tmp_path):
    out = tmp_path / "r.safetensors"
    run = _torchrun(["--model", "tiny-llava", "--budget", "0.5", "--quiet", "--calibration", "/no/such/place", "-o", str(out)])
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("recipe-compile: error:")]
    assert len(errors) == 1 and "calibration data not found" in errors[0], run.stderr[-3000:]
    assert not out.exists()
