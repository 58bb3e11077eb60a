import sys

from ndot.bench.cli import main

sys.exit(main())
