"""bench/gpu_check.sh, the one prepared call on a lent GPU, still runs: its dry run on this CPU.

A GPU is lent to few sessions and for minutes; a script broken by a change here would waste one.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_result_and_exits_0(gpu_check_dry_run):
    done, out = gpu_check_dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("gpu_check: exit status 0")

    log = (out / "tests.log").read_text()
    # The CUDA tests skip here, each with its reason; on the GPU none may.
    assert " passed" in log and "failed" not in log and "SKIPPED" in log
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"env", "ann", "snn", "memory_vs_T", "targets", "profile"} <= kinds and "error" not in kinds
    assert "| " in (out / "bench.md").read_text()
    # The data benchmark's CIFAR part, which is all the GPU machine can run: it has neither tonic nor faery.
    data_rows = [json.loads(line) for line in (out / "bench_data.jsonl").read_text().splitlines()]
    assert {(r["bench"], r["autoaugment"]) for r in data_rows} == {(f"cifar_{p}_pipeline", aa) for p in ("cpu", "device") for aa in (True, False)}
    assert all(r["images_per_s"] > 0 for r in data_rows)


@pytest.mark.parametrize("scale", ["0", "2.5", "x", "08"])
def test_a_limit_scale_that_is_no_whole_number_is_refused_before_any_stage(tmp_path, scale):
    # Unchecked, bash's arithmetic read "x" as 0 (timeout 0: no limit at all), and "2.5" and "08" (octal) failed mid-script.
    env = {**os.environ, "OUT": str(tmp_path / "out"), "LIMIT_SCALE": scale}
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr == f"gpu_check: LIMIT_SCALE must be a whole number >= 1, got '{scale}'\n"
    assert not (tmp_path / "out").exists()
