"""bench/gpu_check.sh, the one prepared call on a lent GPU, still runs: its dry run on this CPU.

A GPU is lent to few sessions and for minutes; a script broken by a change here would waste one.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_writes_every_result_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path),
           "BENCH_ARGS": "--small", "BENCH_DATA_ARGS": "--small --threads 1"}
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("gpu_check: exit status 0")

    log = (tmp_path / "tests.log").read_text()
    # The CUDA tests skip here, each with its reason; on the GPU none may.
    assert " passed" in log and "failed" not in log and "SKIPPED" in log
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"env", "ann", "snn", "memory_vs_T", "targets", "profile"} <= kinds and "error" not in kinds
    assert "| " in (tmp_path / "bench.md").read_text()
    data_rows = [json.loads(line) for line in (tmp_path / "bench_data.jsonl").read_text().splitlines()]
    assert len(data_rows) == 4 and all(r["images_per_s"] > 0 for r in data_rows)
