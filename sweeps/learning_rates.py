"""Learning-rate sweep: per rule, Optuna searches lr (and, in the paper preset, momentum and loss alpha).

    python sweeps/learning_rates.py --preset smoke
    python sweeps/learning_rates.py --preset paper --lr 0.01,1 --trials 16 --address auto
"""
from ndot.cli import run
from ndot.sweep.cli import main
from ndot.sweep.definitions import LEARNING_RATES

if __name__ == "__main__":
    run(lambda: main(LEARNING_RATES))
