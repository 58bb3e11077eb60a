"""The results side of a sweep: the trials table's measures, the per-stratum summary, the figures, the command line."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.text import Text

from helpers import HANG_S, exit_status
from ndot import plots, results


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
    # Strata the order does not name follow those it does.
    assert list(results.summary(trials, order=["T=2,ndot_A"]).index) == ["T=2,ndot_A", "T=1,ndot_A"]
    assert table.loc["T=2,ndot_A", "best_test_acc"] == 0.5 and "1 errored" in table.loc["T=2,ndot_A", "outcomes"]
    assert table["best_epoch"].dtype == "Int64"
    # What the sweep searched besides lr: the best trial's, where the trials differ in it.
    assert "momentum" not in results.summary(trials.assign(momentum=0.9))
    assert results.summary(trials.assign(momentum=[0.9, 0.85, 0.8, 0.95]))["momentum"].tolist() == [0.85, 0.95]

    trials.to_parquet(tmp_path / "trials.parquet")
    assert results.main(["summary", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "0.9500" in printed and "T=2,ndot_A" in printed
    trials.assign(lr=[0.1, 0.0313982, 1.0, 0.2]).to_parquet(tmp_path / "trials.parquet")
    assert results.main(["summary", str(tmp_path)]) == 0
    assert "0.0313982" in capsys.readouterr().out
    trials.to_parquet(tmp_path / "trials.parquet")
    # As the sweep printed it: in the plan's order, not the table's.
    (tmp_path / results.PLAN_FILE).write_text(json.dumps({"strata": [{"label": "T=2,ndot_A"}, {"label": "T=1,ndot_A"}]}))
    assert results.main(["summary", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("T=2,ndot_A") < printed.index("T=1,ndot_A")


def test_a_summary_whose_reader_goes_away_ends_as_sigpipe_ends_a_command(tmp_path):
    # `python -m ndot.results summary DIR | head -1`: a summary longer than a pipe holds (64 KiB) fails its write
    # once head has gone, which is no storage error to report but the end cli.run gives a command SIGPIPE ends.
    strata = [f"T={t},ndot_A" for t in range(1, 2001)]
    pd.DataFrame({"stratum": strata, "best_test_acc": 0.9, "final_test_acc": 0.9, "lr": 0.1, "best_epoch": 3,
                  "status": "completed", "checkpoint": [f"{s}/checkpoint_000002" for s in strata]}
                 ).to_parquet(tmp_path / "trials.parquet")
    proc = subprocess.Popen([sys.executable, "-m", "ndot.results", "summary", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "best_test_acc" in proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=HANG_S) == 128 + signal.SIGPIPE and proc.stderr.read() == ""


def test_collect_refuses_a_folder_that_is_no_sweep_in_one_line(tmp_path, capsys):
    assert results.main(["collect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a sweep's experiment folder" in err and "the sweeps in it" not in err
    # The --storage folder, which holds the sweeps: the one line names them.
    for name in ("t-smoke", "a-smoke"):
        (tmp_path / name).mkdir()
        (tmp_path / name / results.PLAN_FILE).write_text("{}")
    (tmp_path / "not-a-sweep").mkdir()
    for command in ("collect", "summary", "plot"):
        assert results.main([command, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.rstrip().endswith("; the sweeps in it: a-smoke, t-smoke"), err


def test_load_names_the_tables_it_knows():
    # A slip such as "trial" would otherwise read as a missing file.
    with pytest.raises(ValueError, match="^table must be 'epochs' or 'trials', got 'trial'$"):
        results.load("runs/sweeps/any", table="trial")


def test_load_takes_a_path_to_a_table_as_it_takes_one_to_the_folder(tmp_path):
    pd.DataFrame({"trial_id": ["a", "b"]}).to_parquet(tmp_path / "trials.parquet")
    for path in (tmp_path, tmp_path / "trials.parquet"):
        assert results.load(path, results.TRIALS_TABLE)["trial_id"].tolist() == ["a", "b"]


def test_summary_of_a_folder_without_tables_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert results.main(["summary", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "experiment folder" in err
    for command in ("collect", "summary", "plot"):
        assert results.main([command, str(tmp_path / "nothing")]) == 2
        assert capsys.readouterr().err == f"error: {tmp_path / 'nothing'} does not exist\n"


@pytest.mark.parametrize("folder, says", [
    ("", "error: argument DIR: must name a file or folder, got an empty string"),  # an unset shell variable
    ("foo://x", "error: foo://x: Unrecognized filesystem type"),
    ("s3://", "error: s3://: "),
])
def test_a_dir_that_names_no_folder_is_named_in_the_one_line(capsys, folder, says):
    for command in ("collect", "summary", "plot"):
        assert exit_status(results.main, [command, folder]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(says), err


def test_summary_and_plot_refuse_a_table_file_in_one_line(tmp_path, capsys):
    for command in ("summary", "plot"):
        assert results.main([command, str(tmp_path / "epochs.parquet")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "give the experiment folder" in err


def test_tables_of_something_else_are_refused_in_one_line(tmp_path, capsys):
    for table in (results.TRIALS_TABLE, results.EPOCHS_TABLE):
        pd.DataFrame({"x": [1, 2]}).to_parquet(results.table_uri(str(tmp_path), table))
    for command in ("summary", "plot"):
        assert results.main([command, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "lacks the column" in err, err


def test_a_sweep_with_no_finished_epoch_says_so(tmp_path, capsys):
    (tmp_path / results.PLAN_FILE).write_text("{}")
    assert results.main(["summary", str(tmp_path)]) == 1
    assert "no tables yet" in capsys.readouterr().err
    # Its tables collected before any trial began (a driver killed at once): empty, not another sweep's.
    results.write_tables(str(tmp_path), [])
    for command in ("summary", "plot"):
        assert results.main([command, str(tmp_path)]) == 1
        assert "no trial yet" in capsys.readouterr().err
    # Trials whose every value a figure draws is missing (pending, or diverged before a measure): no figure.
    pd.DataFrame([{"stratum": "T=1,ndot_A", "T": 1, "arch": "small_cnn", "method": "ndot_A", "epochs_run": 0}]).to_parquet(
        results.table_uri(str(tmp_path), results.TRIALS_TABLE))
    assert results.main(["plot", str(tmp_path)]) == 1
    assert capsys.readouterr().err.endswith("nothing to draw: no trial has an accuracy or a cost yet\n")
    assert not list(tmp_path.glob("*.png"))


def _history(epochs: int, started_at: float) -> list[dict]:
    config = {"dataset": "digits", "arch": "small_cnn", "T": 2, "epochs": epochs}
    metrics = [{"epoch": e, "train_loss": 1.0 / e, "test_acc": 0.5 + 0.1 * e, "best_test_acc": 0.5 + 0.1 * e,
                "epoch_seconds": 10.0, "peak_mem_mb": 1.0, "image_steps_per_s": 100.0, "status": "ok"}
               for e in range(1, epochs + 1)]
    return [results.epoch_row("t0", config, m, {"started_at": started_at}, started_at + 30.0 + 12.0 * m["epoch"])
            for m in metrics]


def test_the_trials_table_says_what_each_trial_ran_on_and_the_cost_figure_what_its_memory_is():
    # The config's device is "auto" in every sweep: the table did not say whether peak_mem_mb was a GPU's
    # allocation or a CPU process's resident set, and the figure's note gave both meanings to choose from.
    def note(trials: pd.DataFrame) -> str:  # Figure.get_supxlabel is matplotlib >= 3.8's
        [text] = {t.get_text() for t in plots.cost_vs_axis(trials).findobj(Text) if t.get_text().startswith(("peak memory:", "peak memory,"))}
        return text

    rows = [{**row, "ran_on": where} for row, where in zip(_history(2, started_at=0.0), ("cuda:0 NVIDIA A10G", "cpu"))]
    assert results.trials_frame([results.TrialRecord("t0", rows[0], "TERMINATED", 0, rows, "t0/c")])["ran_on"].tolist() == ["cpu"]
    said = note(_trials(["small_cnn"], [1, 4]).assign(ran_on="cpu"))
    assert said.startswith("peak memory, every trial on the CPU: the peak resident set") and "GPU" not in said
    said = note(_trials(["small_cnn"], [1, 4]).assign(ran_on="cuda:0 NVIDIA H100"))
    assert said == "peak memory, every trial on cuda:0 NVIDIA H100: the most allocated on the GPU in an epoch"
    # Both kinds, or a table from before the column: both meanings.
    for trials in (_trials(["small_cnn"], [1, 4]).assign(ran_on=["cpu", "cuda:0 NVIDIA H100"] * 2), _trials(["small_cnn"], [1, 4])):
        said = note(trials)
        assert "on a GPU, the most allocated" in said and "on a CPU, the peak resident set" in said


def test_a_trials_wall_time_runs_from_its_measured_start():
    # The first epoch ended 42 s after the trial started: 30 s of setup, 10 of training, 2 of testing.
    history = _history(3, started_at=1000.0)
    record = results.TrialRecord("t0", history[0], "TERMINATED", 0, history, "t0/checkpoint_000002")
    row = results.trials_frame([record]).iloc[0]
    assert row["started_at"] == pd.Timestamp(1000.0, unit="s", tz="UTC")
    assert row["wall_time_s"] == 30.0 + 12.0 * 3 and row["train_time_s"] == 30.0
    assert row["status"] == "completed" and row["best_epoch"] == 3
    assert results.epochs_frame([record])["started_at"].iloc[0] == row["started_at"]


def test_a_trials_best_epoch_is_the_last_at_its_best_accuracy_and_its_memory_the_peak():
    # Ties: best.pt is rewritten at every epoch that equals the best, so it holds the last of them.
    history = _history(4, started_at=0.0)
    for row, acc, mem in zip(history, (0.6, 0.8, 0.8, 0.7), (5.0, 9.0, 7.0, 6.0)):
        row.update(test_acc=acc, peak_mem_mb=mem)
    row = results.trials_frame([results.TrialRecord("t0", history[0], "TERMINATED", 0, history, "t0/c")]).iloc[0]
    assert (row["best_epoch"], row["peak_mem_mb"]) == (3, 9.0)


def test_a_trials_speed_is_the_median_of_its_epochs():
    # A first epoch slowed by warm-up (compilation, the data cache) does not drag the trial's speed down.
    history = _history(3, started_at=0.0)
    for row, speed in zip(history, (10.0, 100.0, 110.0)):
        row["image_steps_per_s"] = speed
    row = results.trials_frame([results.TrialRecord("t0", history[0], "TERMINATED", 0, history, "t0/c")]).iloc[0]
    assert row["image_steps_per_s"] == 100.0


def test_a_trials_status_says_how_it_ended():
    done, short = {"epoch": 3, "status": "ok"}, {"epoch": 1, "status": "ok"}
    diverged = {"epoch": 1, "status": "diverged"}
    assert results.outcome("TERMINATED", done, 3) == results.COMPLETED
    # Ended by Tune short of its epochs: ASHA stopped it.
    assert results.outcome("TERMINATED", short, 3) == results.STOPPED_EARLY
    assert results.outcome("TERMINATED", diverged, 3) == results.DIVERGED
    # An error is an error even after the last epoch, or before the first.
    for last in (short, done, None):
        assert results.outcome("ERROR", last, 3) == results.ERRORED
    assert results.outcome("RUNNING", short, 3) == "running" and results.outcome("PENDING", None, 3) == "pending"
    assert results.outcome(results.UNKNOWN, short, 3) == "unknown"
    row = results.trials_frame([results.TrialRecord("t0", _history(3, 0.0)[0], "TERMINATED", 0, _history(3, 0.0)[:1], "t0/c")])
    assert row["status"].tolist() == [results.STOPPED_EARLY]


def test_a_stratums_best_trial_is_the_one_with_the_best_epoch_not_the_best_last_epoch():
    trials = pd.DataFrame({"stratum": ["T=1,ndot_A"] * 2, "best_test_acc": [0.95, 0.9], "final_test_acc": [0.5, 0.9],
                           "lr": [0.3, 0.1], "best_epoch": pd.array([1, 3], dtype="Int64"), "status": ["completed"] * 2,
                           "checkpoint": ["a/checkpoint_000000", "b/checkpoint_000002"]})
    best = results.summary(trials).loc["T=1,ndot_A"]
    assert (best["best_test_acc"], best["lr"], best["checkpoint"]) == (0.95, 0.3, "a/checkpoint_000000")


def test_figures_show_each_points_best_trial_and_the_memory_column():
    trials = pd.concat([_trials(["small_cnn"], [1, 4]), _trials(["small_cnn"], [1, 4]).assign(
        best_test_acc=0.5, peak_mem_mb=30.0, image_steps_per_s=300.0)])
    [ax] = plots.accuracy_vs_axis(trials).axes
    assert all(list(line.get_ydata()) == [90.0, 90.0] for line in ax.get_lines())
    mem, speed = plots.cost_vs_axis(trials).axes
    assert all(list(line.get_ydata()) == [20.0, 20.0] for line in mem.get_lines())  # the median of 10 and 30
    # peak_mem_mb counts 2**20 bytes (ndot.memory), 4.9 % more than an MB.
    assert (mem.get_ylabel(), speed.get_ylabel()) == ("peak memory (MiB)", "training image-steps / s")
    assert all(list(line.get_ydata()) == [200.0, 200.0] for line in speed.get_lines())


def test_memory_and_throughput_are_drawn_from_zero():
    # 100 and 110 MiB, 1,000 and 1,100 image-steps/s: autoscaled to the data's range, the one looked several times the other.
    trials = pd.concat([_trials(["small_cnn"], [1, 4]).assign(peak_mem_mb=100.0, image_steps_per_s=1000.0),
                        _trials(["small_cnn"], [6]).assign(peak_mem_mb=110.0, image_steps_per_s=1100.0)])
    for fig in (plots.cost_vs_axis(trials), plots.cost_vs_axis(_trials(["small_cnn", "resnet_ws"], [2]))):
        for ax in fig.axes:
            assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > max(max(line.get_ydata()) for line in ax.get_lines())


def _trials(archs: list[str], Ts: list[int], methods: tuple[str, ...] = ("ndot_A", "ottt_A")) -> pd.DataFrame:
    rows = [{"trial_id": f"{arch}-{m}-{T}", "dataset": "digits", "arch": arch, "method": m, "T": T, "lr": 0.1 * T,
             "best_test_acc": 0.9, "peak_mem_mb": 10.0, "image_steps_per_s": 100.0, "epochs_run": 1, "status": "completed"}
            for arch in archs for m in methods for T in Ts]
    return pd.DataFrame(rows)


def _epochs(trials: pd.DataFrame) -> pd.DataFrame:
    """The epochs table of `trials` as `_trials` makes them: one epoch each, at its best accuracy."""
    return pd.DataFrame({"trial_id": trials["trial_id"], "epoch": 1, "test_acc": trials["best_test_acc"], "train_loss": 1.0})


def test_figures_draw_a_line_per_rule_and_architecture():
    one = plots.accuracy_vs_axis(_trials(["small_cnn"], [1, 4]))
    assert [line.get_label() for line in one.axes[0].get_lines()] == ["ndot_A", "ottt_A"]
    assert "small_cnn" in one.axes[0].get_title()
    two = plots.accuracy_vs_axis(_trials(["small_cnn", "resnet_ws"], [1, 4]))
    assert sorted(line.get_label() for line in two.axes[0].get_lines()) == [
        "ndot_A, resnet_ws", "ndot_A, small_cnn", "ottt_A, resnet_ws", "ottt_A, small_cnn"]
    for ax in plots.cost_vs_axis(_trials(["small_cnn", "resnet_ws"], [1, 4])).axes:
        assert len(ax.get_lines()) == 4


def test_every_line_can_be_told_apart_and_a_rule_looks_the_same_in_every_figure():
    # Three architectures along T: twelve lines, past tab10's ten colours, which the colour cycle repeated
    # (ottt_A on small_cnn as bptt_A on resnet_ws). A rule is a colour and a marker, an architecture a line style.
    trials = _trials(["small_cnn", "resnet_ws", "vgg11_ws"], [1, 4], ("bptt_A", "ndot_A", "ndot_O", "ottt_A"))
    for ax in (plots.accuracy_vs_axis(trials).axes[0], *plots.cost_vs_axis(trials).axes):
        lines = ax.get_lines()
        assert len(lines) == 12
        look = {line.get_label(): (to_hex(line.get_color()), line.get_marker(), line.get_linestyle()) for line in lines}
        assert len(set(look.values())) == 12
        by_method = {}
        for label, (colour, marker, _) in look.items():
            by_method.setdefault(label.split(", ")[0], set()).add((colour, marker))
        assert all(len(v) == 1 for v in by_method.values()) and len({v.pop() for v in by_method.values()}) == 4
        by_arch = {}
        for label, (_, _, ls) in look.items():
            by_arch.setdefault(label.split(", ")[1], set()).add(ls)
        assert all(len(v) == 1 for v in by_arch.values()) and len({v.pop() for v in by_arch.values()}) == 3
    # The learning-rate figure draws each rule as the lines do.
    lr = plots.accuracy_vs_lr(_trials(["small_cnn"], [1, 4])).axes[0]
    [ndot_a] = [line for line in plots.accuracy_vs_axis(_trials(["small_cnn"], [1, 4])).axes[0].get_lines()
                if line.get_label() == "ndot_A"]
    assert to_hex(lr.collections[0].get_edgecolor()[0]) == to_hex(ndot_a.get_color())


def test_a_rule_looks_the_same_whichever_other_rules_a_figure_draws():
    # ndot_O's trials all diverged in their first epoch: the accuracy figures, drawn without it, gave ndot_A
    # the colour and marker ndot_O had in the cost figure, and ottt_A ndot_A's.
    trials = _trials(["small_cnn"], [1, 4], ("ndot_O", "ndot_A", "ottt_A"))
    trials.loc[trials["method"] == "ndot_O", "best_test_acc"] = math.nan
    figures = plots.render(trials, _epochs(trials))
    assert {"accuracy_vs_T", "cost_vs_T"} <= set(figures)

    def looks(ax) -> dict[str, tuple]:
        return {line.get_label(): (to_hex(line.get_color()), line.get_marker()) for line in ax.get_lines()}

    with_o = looks(plots.cost_vs_axis(trials).axes[1])
    without_o = looks(plots.accuracy_vs_axis(trials.dropna(subset=["best_test_acc"])).axes[0])  # as render draws it
    assert without_o == {m: with_o[m] for m in ("ndot_A", "ottt_A")}
    assert looks(plots.accuracy_vs_axis(_trials(["small_cnn"], [1, 4], ("ottt_A",))).axes[0]) == {"ottt_A": with_o["ottt_A"]}


def test_rules_this_version_does_not_know_look_unlike_each_other_and_the_known_ones():
    # A newer ndot's tables: each unknown rule after every known one, not all on one slot.
    trials = _trials(["small_cnn"], [1, 4], ("ndot_A", "zeta_A", "zeta_O"))
    looks = [(to_hex(line.get_color()), line.get_marker()) for line in plots.accuracy_vs_axis(trials).axes[0].get_lines()]
    assert len(looks) == 3 and len(set(looks)) == 3
    # Past tab10's ten colours and the ten markers: the second unknown rule took ndot_O's colour and circle.
    many = (*plots.METHODS, *(f"zeta{i}_A" for i in range(12)))
    lines = plots.accuracy_vs_axis(_trials(["small_cnn"], [1, 4], many)).axes[0].get_lines()
    looks = {line.get_label(): (to_hex(line.get_color()), line.get_marker()) for line in lines}
    assert len(looks) == len(many) and len(set(looks.values())) == len(many)


def test_coinciding_points_nest_and_accuracy_stays_under_100_percent():
    # The architectures smoke sweep: bptt_A and ndot_A both at 97.2 %, one point each. Markers of one size drew
    # ndot_A's square over bptt_A's circle, and the axis, autoscaled round one value, ran to 102 %.
    trials = _trials(["small_cnn"], [2], ("bptt_A", "ndot_A")).assign(best_test_acc=0.972)
    ax = plots.accuracy_vs_axis(trials).axes[0]
    sizes = [(line.get_label(), line.get_markersize()) for line in ax.get_lines()]
    # Drawn largest first: the later, smaller marker sits inside the earlier one.
    assert [label for label, _ in sizes] == ["ndot_A", "bptt_A"] and sizes[0][1] > sizes[1][1]
    assert 97.2 < ax.get_ylim()[1] <= 100.5
    lr = plots.accuracy_vs_lr(trials.assign(lr=[0.1, 0.1])).axes[0]
    assert lr.collections[0].get_sizes()[0] > lr.collections[1].get_sizes()[0] and lr.get_ylim()[1] <= 100.5


def test_rules_come_in_the_projects_order_not_the_alphabets():
    # As the sweeps list them (ndot_O, ndot_A, ottt_A, bptt_A): alphabetically bptt_A came first.
    trials = _trials(["small_cnn"], [1, 4], ("bptt_A", "ndot_A", "ndot_O", "ottt_A", "sltt_A")).assign(lr=lambda d: 0.1 * (d.index + 1))
    order = ["ndot_O", "ndot_A", "ottt_A", "sltt_A", "bptt_A"]
    for fig in (plots.accuracy_vs_axis(trials), plots.cost_vs_axis(trials), plots.accuracy_vs_lr(trials)):
        [legend] = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert [t.get_text() for t in legend.get_texts()] == order
    # A rule this version does not know goes last rather than breaking the figure.
    odd = _trials(["small_cnn"], [1, 4], ("zeta_A", "bptt_A"))
    assert [line.get_label() for line in plots.accuracy_vs_axis(odd).axes[0].get_lines()] == ["bptt_A", "zeta_A"]


def test_legends_sit_clear_of_the_data():
    # Inside the axes, a legend of twelve lines lay on them wherever matplotlib put it.
    trials = _trials(["small_cnn", "resnet_ws", "vgg11_ws"], [1, 4])
    for fig in (plots.accuracy_vs_axis(trials), plots.cost_vs_axis(trials), plots.accuracy_vs_lr(trials)):
        fig.canvas.draw()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 1  # the cost figure's two panels draw the same lines: one legend
        box = legends[0].get_window_extent()
        for ax in fig.axes:
            if ax.get_visible():
                frame = ax.get_window_extent()
                assert box.x0 >= frame.x1 or box.x1 <= frame.x0 or box.y0 >= frame.y1 or box.y1 <= frame.y0
        # Within the figure: nothing cut off at its edge.
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)


def test_plotting_again_removes_the_figures_the_table_no_longer_draws(tmp_path):
    # An architectures sweep whose first trials all ran at one T is drawn against the architecture; once a
    # trial at another T ends, against T: the earlier accuracy_vs_arch.png stood beside the new figures.
    experiment = str(tmp_path)

    def tables(trials: pd.DataFrame) -> None:
        trials.to_parquet(tmp_path / "trials.parquet")
        _epochs(trials).to_parquet(tmp_path / "epochs.parquet")

    for Ts, drawn in (([2], {"accuracy_vs_arch", "cost_vs_arch", "curves_vs_epoch"}),
                      ([2, 4], {"accuracy_vs_T", "cost_vs_T", "accuracy_vs_lr", "curves_vs_epoch"})):
        tables(_trials(["small_cnn", "resnet_ws"], Ts))
        assert sorted(results.write_plots(experiment)) == sorted(results.join(experiment, f"{n}.png") for n in drawn)
        assert {p.stem for p in tmp_path.glob("*.png")} == drawn
    (tmp_path / "notes.png").write_bytes(b"a figure of the user's own")
    tables(_trials(["small_cnn", "resnet_ws"], [2]))
    results.write_plots(experiment)
    assert {p.stem for p in tmp_path.glob("*.png")} == {"accuracy_vs_arch", "cost_vs_arch", "curves_vs_epoch", "notes"}
    # A table in which no trial has an accuracy (each diverged in its first epoch): the curves drawn before go too.
    tables(_trials(["small_cnn", "resnet_ws"], [2]).assign(best_test_acc=math.nan))
    results.write_plots(experiment)
    assert {p.stem for p in tmp_path.glob("*.png")} == {"cost_vs_arch", "notes"}


def test_drawing_a_sweeps_figures_leaves_the_processs_matplotlib_as_it_was(tmp_path):
    # A notebook that ran a sweep (or write_plots) had its inline backend set to Agg by ndot.plots' import, in a
    # fresh process here: its figures no longer showed. "svg" stands in for the notebook's backend.
    _trials(["small_cnn"], [2, 4]).to_parquet(tmp_path / "trials.parquet")
    _epochs(_trials(["small_cnn"], [2, 4])).to_parquet(tmp_path / "epochs.parquet")
    code = ("import sys; import matplotlib.pyplot as plt; plt.switch_backend('svg'); fig = plt.figure()\n"
            "from ndot import results; drawn = results.write_plots(sys.argv[1])\n"
            "print(len(drawn), plt.get_backend(), plt.get_fignums() == [fig.number])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=HANG_S)
    assert out.stdout.split() == ["4", "svg", "True"], out.stderr


def _curves(*trials: tuple[str, int, str, list[float], list[float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials and epochs tables of trials given as (method, T, status, test accuracy and training loss by epoch)."""
    rows, epochs = [], []
    for i, (m, T, status, accs, losses) in enumerate(trials):
        tested = [a for a in accs if not math.isnan(a)]
        rows.append({"trial_id": f"t{i}", "dataset": "digits", "arch": "small_cnn", "method": m, "T": T, "lr": 0.1,
                     "best_test_acc": max(tested) if tested else math.nan, "epochs_run": len(accs), "status": status})
        epochs += [{"trial_id": f"t{i}", "epoch": e, "test_acc": a, "train_loss": loss}
                   for e, (a, loss) in enumerate(zip(accs, losses), 1)]
    return pd.DataFrame(rows), pd.DataFrame(epochs)


def test_the_curves_figure_draws_each_strata_best_trial_by_epoch():
    # Whether the trial accuracy_vs_T scores had converged or was still learning when it stopped: its accuracy
    # and loss at each epoch, a row per T. The other trial of each stratum ends higher but peaked lower.
    trials, epochs = _curves(("ottt_A", 1, "completed", [0.5, 0.7, 0.9], [1.0, 0.5, 0.25]),
                             ("ottt_A", 1, "completed", [0.6, 0.8, 0.85], [2.0, 1.0, 0.1]),
                             ("ndot_A", 1, "completed", [0.4, 0.8, 0.95], [1.5, 0.6, 0.2]),
                             ("ndot_A", 4, "completed", [0.86, 0.87, 0.88], [0.9, 0.8, 0.7]),
                             ("ndot_A", 4, "completed", [0.5, 0.96, 0.7], [1.2, 0.4, 0.6]),
                             ("ottt_A", 4, "completed", [0.3, 0.6, 0.9], [1.1, 0.7, 0.3]))
    fig = plots.curves_vs_epoch(trials, epochs)
    assert [ax.get_title() for ax in fig.axes] == ["T=1", "T=1", "T=4", "T=4"]
    assert [(ax.get_ylabel(), ax.get_yscale()) for ax in fig.axes[:2]] == [
        ("test accuracy (%)", "linear"), ("training loss (log scale)", "log")]
    drawn = {(ax.get_ylabel(), T, line.get_label()): (list(line.get_xdata()), [round(y, 6) for y in line.get_ydata()])
             for ax, T in zip(fig.axes, (1, 1, 4, 4)) for line in ax.get_lines()}
    assert drawn == {("test accuracy (%)", 1, "ndot_A"): ([1, 2, 3], [40.0, 80.0, 95.0]),
                     ("test accuracy (%)", 1, "ottt_A"): ([1, 2, 3], [50.0, 70.0, 90.0]),
                     ("training loss (log scale)", 1, "ndot_A"): ([1, 2, 3], [1.5, 0.6, 0.2]),
                     ("training loss (log scale)", 1, "ottt_A"): ([1, 2, 3], [1.0, 0.5, 0.25]),
                     ("test accuracy (%)", 4, "ndot_A"): ([1, 2, 3], [50.0, 96.0, 70.0]),
                     ("test accuracy (%)", 4, "ottt_A"): ([1, 2, 3], [30.0, 60.0, 90.0]),
                     ("training loss (log scale)", 4, "ndot_A"): ([1, 2, 3], [1.2, 0.4, 0.6]),
                     ("training loss (log scale)", 4, "ottt_A"): ([1, 2, 3], [1.1, 0.7, 0.3])}
    # The trials accuracy_vs_T draws, in the same colours and markers; one legend, in the rules' order.
    points = {line.get_label(): line for line in plots.accuracy_vs_axis(trials).axes[0].get_lines()}
    for ax, T in zip(fig.axes[::2], (1, 4)):
        for line in ax.get_lines():
            point = points[line.get_label()]
            assert max(line.get_ydata()) == point.get_ydata()[list(point.get_xdata()).index(T)]
            assert (to_hex(line.get_color()), line.get_marker()) == (to_hex(point.get_color()), point.get_marker())
    [legend] = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert [t.get_text() for t in legend.get_texts()] == ["ndot_A", "ottt_A"]
    # The log loss axis in decimals, as the learning rates: under a decade matplotlib labelled 2×10⁻¹, 3×10⁻¹, ….
    fig.canvas.draw()
    loss = fig.axes[1]
    lo, hi = loss.get_ylim()
    assert [t.get_text() for t, y in zip(loss.get_yticklabels(), loss.get_yticks()) if lo <= y <= hi] == ["0.2", "0.5", "1"]
    assert not [t.get_text() for t in loss.get_yticklabels(minor=True) if t.get_text()]
    assert "curves_vs_epoch" in plots.render(trials, epochs) and "curves_vs_epoch" in plots.NAMES


def test_the_curves_of_a_trial_that_did_not_complete_are_hollow_and_a_diverged_epoch_is_no_point():
    trials, epochs = _curves(("ndot_A", 2, "stopped_early", [0.5, 0.9], [1.0, 0.5]),
                             ("ndot_A", 2, "completed", [0.5, 0.6, 0.7], [1.0, 0.8, 0.6]),
                             # Diverged in its third epoch, after its best: untested, a loss of inf.
                             ("ottt_A", 2, "diverged", [0.4, 0.8, math.nan], [1.0, 0.5, math.inf]),
                             # Diverged in its first: no accuracy, so no stratum's best; the only trial of its stratum.
                             ("ndot_A", 4, "diverged", [math.nan], [math.inf]),
                             ("ottt_A", 4, "completed", [0.7], [0.9]))
    fig = plots.curves_vs_epoch(trials.dropna(subset=["best_test_acc"]), epochs)  # the trials render gives it
    acc, loss = fig.axes[:2]
    drawn = {(ax.get_ylabel(), line.get_label()): (line.get_ydata().tolist(), line.get_markerfacecolor())
             for ax in (acc, loss) for line in ax.get_lines()}
    assert drawn[("test accuracy (%)", "ndot_A")] == ([50.0, 90.0], "none")  # the stratum's best, stopped early
    assert drawn[("training loss (log scale)", "ndot_A")] == ([1.0, 0.5], "none")
    assert drawn[("training loss (log scale)", "ottt_A")] == ([1.0, 0.5, math.inf], "none")
    fig.canvas.draw()
    assert 0 < loss.get_ylim()[0] < 0.5 and 1.0 < loss.get_ylim()[1] < 2  # the inf is no point, not an axis to infinity
    assert [ax.get_title() for ax in fig.axes] == ["T=2", "T=2", "T=4", "T=4"]
    [line] = fig.axes[2].get_lines()
    assert line.get_label() == "ottt_A" and line.get_markerfacecolor() != "none"
    [legend] = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legend.get_texts()[-1].get_text() == "best trial did not complete"
    assert "curves_vs_epoch" in plots.render(trials, epochs)


def test_a_table_of_one_epoch_per_trial_draws_curves_of_one_point():
    # The smoke run of a sweep stopped after its first epoch, or --epochs 1.
    trials = _trials(["small_cnn"], [1, 4])
    png = plots.render(trials, _epochs(trials))["curves_vs_epoch"]
    assert png.startswith(b"\x89PNG")
    fig = plots.curves_vs_epoch(trials, _epochs(trials))
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 8 and all(line.get_xdata().tolist() == [1] and line.get_marker() not in ("", "None") for line in lines)
    fig.canvas.draw()
    ax = fig.axes[-1]
    lo, hi = ax.get_xlim()
    assert [t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= x <= hi] == ["1"]  # no epoch 0.95


def test_several_architectures_at_one_T_are_drawn_against_the_architecture():
    trials = _trials(["small_cnn", "resnet_ws"], [2]).assign(lr=[0.1, 0.2, 0.3, 0.4])
    assert set(plots.render(trials, _epochs(trials))) == {"accuracy_vs_arch", "accuracy_vs_lr", "cost_vs_arch", "curves_vs_epoch"}
    ax = plots.accuracy_vs_axis(trials).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["ndot_A", "ottt_A"]
    assert ax.get_xlabel() == "architecture" and "T=2" in ax.get_title()
    assert all(line.get_linestyle() == "None" and len(line.get_xdata()) == 2 for line in ax.get_lines())
    for ax in plots.cost_vs_axis(trials).axes:
        assert len(ax.get_lines()) == 2 and ax.get_xlabel() == "architecture"
    # One architecture, or several at several T: against T, as before.
    trials = _trials(["small_cnn", "resnet_ws"], [1, 2])
    assert set(plots.render(trials, _epochs(trials))) == {"accuracy_vs_T", "accuracy_vs_lr", "cost_vs_T", "curves_vs_epoch"}


def test_a_trial_that_did_not_complete_is_a_hollow_marker():
    # E.g. after Ctrl-C: a running trial's first epoch is not a tuned result, nor is a trial ASHA stopped.
    trials = pd.concat([_trials(["small_cnn"], [1, 4]), _trials(["small_cnn"], [4]).assign(
        best_test_acc=[0.95, 0.5], status=["running", "stopped_early"])])
    ax = plots.accuracy_vs_axis(trials).axes[0]
    filled = {line.get_label(): line for line in ax.get_lines()}
    hollow = [line for line in ax.get_lines() if line.get_label().startswith("_")]
    # ndot_A's T=4 point is the running trial's 95 %, drawn hollow; ottt_A's best (90 %) completed.
    assert list(filled["ndot_A"].get_ydata()) == [90.0, 95.0] and filled["ndot_A"].get_markevery() == [0]
    assert filled["ottt_A"].get_markevery() == [0, 1]
    [h] = hollow
    assert h.get_label() == "_ndot_A" and list(h.get_ydata()) == [95.0] and h.get_markerfacecolor() == "none"
    assert ax.get_legend().get_texts()[-1].get_text() == "best trial did not complete"
    lr = plots.accuracy_vs_lr(trials).axes[1]  # T=4's panel
    faces = {(x, y): c[3] for coll in lr.collections for (x, y), c in zip(coll.get_offsets().tolist(), coll.get_facecolors())}
    assert [faces[(0.4, 95.0)], faces[(0.4, 50.0)], faces[(0.4, 90.0)]] == [0.0, 0.0, 0.8]
    assert lr.get_legend().get_texts()[-1].get_text() == "trial did not complete"
    # Every trial completed: no hollow marker, no legend entry for one.
    ax = plots.accuracy_vs_axis(_trials(["small_cnn"], [1, 4])).axes[0]
    assert not [line for line in ax.get_lines() if line.get_label().startswith("_")]
    assert "did not run" not in " ".join(t.get_text() for t in ax.get_legend().get_texts())


def test_learning_rate_figure_keeps_time_steps_and_architectures_apart():
    # Each (architecture, T) is a search of its own: a panel each, a scatter per rule in it.
    fig = plots.accuracy_vs_lr(_trials(["small_cnn"], [1, 4, 6]))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["T=1", "T=4", "T=6"]
    assert all(len(ax.collections) == 2 for ax in panels)
    assert [t.get_text() for t in panels[-1].get_legend().get_texts()] == ["ndot_A", "ottt_A"]
    trials = _trials(["small_cnn"], [1, 4])
    assert set(plots.render(trials, _epochs(trials))) == {"accuracy_vs_T", "accuracy_vs_lr", "cost_vs_T", "curves_vs_epoch"}
    # The architectures sweep (several at one T): drawn together, each architecture's trials would share a
    # rule's colour and marker, and which point is which architecture could not be told.
    archs = _trials(["small_cnn", "resnet_ws"], [2]).assign(lr=[0.1, 0.2, 0.3, 0.4])
    panels = [ax for ax in plots.accuracy_vs_lr(archs).axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["resnet_ws, T=2", "small_cnn, T=2"]
    assert sorted(p[0] for p in panels[0].collections[0].get_offsets().tolist() + panels[0].collections[1].get_offsets().tolist()) == [0.3, 0.4]
    # Seven panels in rows of three: the third column's lowest is in the second row, and carries its rates.
    seven = plots.accuracy_vs_lr(_trials(["small_cnn"], [1, 2, 3, 4, 5, 6, 7]))
    assert [ax.get_visible() for ax in seven.axes] == [True] * 7 + [False] * 2
    assert [ax.get_xlabel() for ax in seven.axes[6:8]] == ["initial learning rate (log scale)", ""]
    assert seven.axes[5].get_xlabel() == "initial learning rate (log scale)" and seven.axes[2].get_xlabel() == ""
    seven.canvas.draw()
    assert [any(t.get_visible() and t.get_text() for t in seven.axes[i].get_xticklabels()) for i in (2, 5)] == [False, True]


def test_a_learning_rate_figure_is_drawn_only_where_the_trials_differ_in_it():
    # Every trial at the recipe's 0.1 (the smoke preset, one trial a stratum): a column of points on a log axis
    # says nothing of the learning rate.
    trials = _trials(["small_cnn"], [1, 4]).assign(lr=0.1)
    assert set(plots.render(trials, _epochs(trials))) == {"accuracy_vs_T", "cost_vs_T", "curves_vs_epoch"}


def test_a_log_scaled_axis_says_so_in_its_label():
    # Labelled in decimals (0.1, 0.2, 0.5), a log axis read as a linear one: a loss halving looked like a small step.
    trials, epochs = _curves(("ndot_A", 1, "completed", [0.5, 0.9], [2.0, 0.1]), ("ottt_A", 4, "completed", [0.4, 0.8], [1.0, 0.3]))
    trials = trials.assign(lr=[0.01, 0.5], peak_mem_mb=10.0, image_steps_per_s=100.0)
    figures = (plots.accuracy_vs_axis(trials), plots.accuracy_vs_lr(trials), plots.cost_vs_axis(trials),
               plots.curves_vs_epoch(trials, epochs))
    labelled = [(axis.get_scale(), axis.get_label_text()) for fig in figures for ax in fig.axes if ax.get_visible()
                for axis in (ax.xaxis, ax.yaxis) if axis.get_label_text()]
    logs = [label for scale, label in labelled if scale == "log"]
    assert len(set(logs)) == 2 and all(label.endswith("(log scale)") for label in logs), logs  # the rate and the loss
    assert not [label for scale, label in labelled if scale != "log" and "log" in label]


def test_learning_rates_read_as_decimals_that_do_not_run_into_each_other():
    # Under a decade, matplotlib's own log labels (2×10⁻¹, 3×10⁻¹, …) overlapped; over three, 1-2-5 would.
    def labelled(lrs: list[float]) -> list[str]:
        trials = _trials(["small_cnn"], [4]).iloc[[0] * len(lrs)].assign(lr=lrs)
        fig = plots.accuracy_vs_lr(trials)
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        assert all(not t.get_text() for t in ax.get_xticklabels(minor=True))
        return [t.get_text() for t, v in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= v <= hi]

    assert labelled([0.04, 0.83]) == ["0.05", "0.1", "0.2", "0.5"]
    assert labelled([0.001, 1.0]) == ["0.001", "0.01", "0.1", "1"]


def test_the_learning_rate_figure_puts_accuracy_in_percent_over_the_rate_and_costs_are_medians_of_the_trials():
    # Each trial is a point (learning rate, best accuracy in %), the axes' labels; the cost figure's titles
    # say "median over trials", which two trials per point (the other tests) cannot tell from the mean.
    trials = _trials(["small_cnn"], [4]).assign(best_test_acc=[0.8, 0.6], lr=[0.05, 0.2])
    ax = plots.accuracy_vs_lr(trials).axes[0]
    assert sorted(tuple(p) for c in ax.collections for p in c.get_offsets().tolist()) == [(0.05, 80.0), (0.2, 60.0)]
    three = pd.concat([_trials(["small_cnn"], [1, 4]).assign(peak_mem_mb=v, image_steps_per_s=10 * v) for v in (10.0, 20.0, 60.0)])
    mem, speed = plots.cost_vs_axis(three).axes
    assert all(list(line.get_ydata()) == [20.0, 20.0] for line in mem.get_lines())
    assert all(list(line.get_ydata()) == [200.0, 200.0] for line in speed.get_lines())


def test_titles_count_the_trials_per_point():
    # "best of N trials": one number where every point has as many trials, else the range.
    two = pd.concat([_trials(["small_cnn"], [1, 4])] * 2)
    assert "best of 2 trials per point" in plots.accuracy_vs_axis(two).axes[0].get_title()
    uneven = pd.concat([two, _trials(["small_cnn"], [1])])
    assert "best of 2-3 trials per point" in plots.accuracy_vs_axis(uneven).axes[0].get_title()
    assert "best of 1 trial per point" in plots.accuracy_vs_axis(_trials(["small_cnn"], [1, 4])).axes[0].get_title()


def test_a_sweep_whose_every_trial_diverged_at_once_draws_what_it_can_and_keeps_its_columns():
    # Diverged in epoch 1: never tested, so no accuracy (NaN) and no test columns in its rows.
    trials = _trials(["small_cnn"], [1, 4]).assign(best_test_acc=math.nan)
    assert set(plots.render(trials, _epochs(trials).assign(train_loss=math.inf))) == {"cost_vs_T"}
    row = {**_history(1, started_at=0.0)[0], "status": "diverged"}
    for col in ("test_loss", "test_acc", "firing_rate"):
        row.pop(col, None)
    epochs = results.epochs_frame([results.TrialRecord("t0", row, "TERMINATED", 0, [row], "t0/checkpoint_000000")])
    assert {"test_loss", "test_acc", "firing_rate"} <= set(epochs) and epochs["test_acc"].isna().all()


def test_an_epoch_before_its_trials_first_test_has_no_best_accuracy():
    # train() starts a run's best at 0 and reports it with an epoch that diverged: in epoch 1, never
    # tested, the row's best is missing, as the trials table's is, not 0; later, the best of the tested epochs.
    def diverged(row: dict, trial_id: str) -> dict:
        return {**{k: v for k, v in row.items() if k not in ("test_loss", "test_acc", "firing_rate")},
                "trial_id": trial_id, "status": "diverged"}
    at_once = [diverged({**_history(1, started_at=0.0)[0], "best_test_acc": 0.0}, "t0")]
    later = [{**row, "trial_id": "t1"} for row in _history(2, started_at=0.0)]
    later[1] = diverged({**later[1], "best_test_acc": later[0]["test_acc"]}, "t1")
    records = [results.TrialRecord(h[0]["trial_id"], h[0], "TERMINATED", 0, h, None) for h in (at_once, later)]
    epochs = results.epochs_frame(records)
    assert epochs["best_test_acc"].tolist()[1:] == [0.6, 0.6] and math.isnan(epochs["best_test_acc"].iloc[0])
    assert math.isnan(results.trials_frame(records)["best_test_acc"].iloc[0])


def test_tables_of_a_sweep_that_set_a_data_root_and_one_that_did_not_read_as_one_dataset(tmp_path):
    # data_root is None in every row of a sweep that read the data module's root: a column Arrow would type
    # null, to which a dataset over both sweeps' tables (the one without first) cannot cast the other's strings.
    import pyarrow.dataset as ds
    for name, root in (("default", None), ("given", "/data")):
        history = [{**row, "data_root": root} for row in _history(1, started_at=0.0)]
        results.write_tables(str(tmp_path / name), [results.TrialRecord("t0", history[0], "TERMINATED", 0, history, "t0/c")])
    for table in (results.EPOCHS_TABLE, results.TRIALS_TABLE):
        tables = [results.table_uri(str(tmp_path / name), table) for name in ("default", "given")]
        assert ds.dataset(tables).to_table().column("data_root").to_pylist() == [None, "/data"]
        assert results.load(tables[0])["data_root"].isna().all()
    # A sweep whose histories predate ran_on (collected again) beside one that has it.
    for name, where in (("before", None), ("after", "cpu")):
        history = [{**row, **({"ran_on": where} if where else {})} for row in _history(1, started_at=0.0)]
        results.write_tables(str(tmp_path / name), [results.TrialRecord("t0", history[0], "TERMINATED", 0, history, "t0/c")])
    tables = [results.table_uri(str(tmp_path / name), results.TRIALS_TABLE) for name in ("before", "after")]
    assert ds.dataset(tables).to_table().column("ran_on").to_pylist() == [None, "cpu"]


def test_tables_list_the_trials_in_the_order_they_began_however_tune_listed_them(tmp_path):
    # Tune's live list (which moves a restarted trial last) and the experiment state that collect reads
    # list the trials in different orders: the tables written during a sweep and rebuilt after it must be
    # the same, and the summary's pick among trials that tie with them.
    records = []
    for trial_id, started, acc in (("b", 100.0, 0.9), ("a", 200.0, 0.9), ("c", 300.0, 0.8)):
        history = [{**row, "trial_id": trial_id, "test_acc": acc, "lr": started / 1000} for row in _history(2, started_at=started)]
        records.append(results.TrialRecord(trial_id, history[0], "TERMINATED", 0, history, f"{trial_id}/c"))
    records.append(results.TrialRecord("p", records[0].config, "PENDING", 0, [], None))
    for listed in (records, records[::-1], [records[1], records[3], records[2], records[0]]):
        results.write_tables(str(tmp_path), listed)
        trials = results.load(str(tmp_path), results.TRIALS_TABLE)
        assert trials["trial_id"].tolist() == ["b", "a", "c", "p"]
        assert results.load(str(tmp_path))["trial_id"].tolist() == ["b", "b", "a", "a", "c", "c"]
        assert results.summary(trials.assign(stratum="T=2,ndot_A"))["lr"].tolist() == [0.1]


def test_tables_in_storage_that_refuses_the_credentials_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    for command in ("collect", "summary", "plot"):
        assert results.main([command, "gs://ndot-test-bucket/sweeps/x"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "OAuth2" in err, err


def test_a_trial_collected_from_its_folder_alone_keeps_tunes_id_without_the_stratum(tmp_path):
    # Without Tune's state (a driver killed before its first save) the trial id is read off the folder's
    # name, <id>_<stratum> (ndot.sweep.runner.trial_dirname): the tables must hold the id Tune's state
    # would have given, with params.json or, where it was never uploaded, the config in the rows.
    from ndot import checkpoint
    from ndot.config import TrainConfig
    row = {**TrainConfig(T=4).to_dict(), "stratum": "T=4,ndot_A", "epoch": 1, "status": "ok", "test_acc": 0.5, "best_test_acc": 0.5}
    for trial, params in (("fd40def0_T=4,ndot_A", True), ("0a1b2c3d_T=4,ndot_A", False)):
        ckpt = tmp_path / trial / "checkpoint_000000"
        ckpt.mkdir(parents=True)
        checkpoint.write_history(ckpt, [row])
        (ckpt / checkpoint.TRIAL).write_bytes(b"")
        if params:
            (tmp_path / trial / checkpoint.TRIAL_PARAMS).write_text(json.dumps({**TrainConfig(T=4).to_dict(), "stratum": "T=4,ndot_A"}))
    records = results.from_folders(str(tmp_path))
    assert sorted(r.trial_id for r in records) == ["0a1b2c3d", "fd40def0"]
    assert {r.checkpoint for r in records} == {"fd40def0_T=4,ndot_A/checkpoint_000000", "0a1b2c3d_T=4,ndot_A/checkpoint_000000"}
