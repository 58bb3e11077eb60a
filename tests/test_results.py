"""The per-stratum summary of a sweep's trials table."""
from __future__ import annotations

import math

import pandas as pd

from ndot import results


def test_summary_names_each_strata_best_trial_and_outcomes(tmp_path, capsys):
    trials = pd.DataFrame({
        "stratum": ["T=1,ndot_A", "T=1,ndot_A", "T=2,ndot_A", "T=2,ndot_A"],
        "best_test_acc": [0.91, 0.95, math.nan, 0.5],
        "final_test_acc": [0.9, 0.93, math.nan, 0.1],
        "lr": [0.1, 0.03, 1.0, 0.2],
        "best_epoch": pd.array([3, 2, None, 1], dtype="Int64"),
        "status": ["completed", "stopped_early", "errored", "diverged"],
        "checkpoint": ["a/checkpoint_000002", "b/checkpoint_000001", None, "d/checkpoint_000000"],
    })
    table = results.summary(trials)
    assert list(table.index) == ["T=1,ndot_A", "T=2,ndot_A"]
    assert table.loc["T=1,ndot_A", ["trials", "best_test_acc", "final_test_acc", "lr", "best_epoch", "checkpoint"]].tolist() == [
        2, 0.95, 0.93, 0.03, 2, "b/checkpoint_000001"]
    assert list(results.summary(trials, order=["T=2,ndot_A", "T=1,ndot_A"]).index) == ["T=2,ndot_A", "T=1,ndot_A"]
    assert table.loc["T=2,ndot_A", "best_test_acc"] == 0.5 and "1 errored" in table.loc["T=2,ndot_A", "outcomes"]

    trials.to_parquet(tmp_path / "trials.parquet")
    assert results.main(["summary", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "0.9500" in printed and "T=2,ndot_A" in printed


def test_summary_of_a_folder_without_tables_is_one_line(tmp_path, capsys):
    assert results.main(["summary", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "experiment folder" in err
