"""Time-step sweep: every T x every rule, the same Optuna budget each, results in Parquet.

    python sweeps/timesteps.py --preset smoke            # offline, digits, CPU, a few minutes
    python sweeps/timesteps.py --preset paper --address auto --storage s3://BUCKET/sweeps
    python sweeps/timesteps.py --help
"""
from ndot.cli import run
from ndot.sweep.cli import main
from ndot.sweep.definitions import TIMESTEPS

if __name__ == "__main__":
    run(lambda: main(TIMESTEPS))
