"""Architecture sweep: every architecture x every rule at one T, the same Optuna budget each.

    python sweeps/architectures.py --preset smoke
    python sweeps/architectures.py --preset paper --archs vgg11_ws,resnet_ws --T 6 --address auto
"""
from ndot.cli import run
from ndot.sweep.cli import main
from ndot.sweep.definitions import ARCHITECTURES

if __name__ == "__main__":
    run(lambda: main(ARCHITECTURES))
