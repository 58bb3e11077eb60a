"""What every ndot command line shares: bad input is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
from typing import Any, Callable


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage block: bad input is reported like every other error.
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def listed(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    """An argparse type: a comma-separated list of `kind`, repeats dropped, order kept."""
    def parse(text: str) -> tuple:
        try:
            return tuple(dict.fromkeys(kind(v) for v in text.split(",") if v))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")

    parse.__name__ = f"{kind.__name__} list"
    return parse
