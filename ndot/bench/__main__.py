from ndot.bench.cli import main
from ndot.cli import run

run(main)
