"""What every ndot command line shares: bad input is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, NoReturn, Sequence

import torch


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, no abbreviated flags, and `-` or `_` alike inside a flag's name.

    Abbreviations are off because they turn slips into other settings: `--t 4`
    would set tau, `--storag x` would be taken for `--storage`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # A value that starts with a minus and a digit is a value, not a flag: argparse's own pattern takes
        # only plain negative numbers, so `--lr -1e-3` and `--lr -0.1,0.3` got "expected one argument"
        # instead of reaching the check that says what is wrong with them. (No flag here starts -<digit>.)
        # A private attribute of argparse, matched with .match, as in Python 3.8 to 3.13.
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:  # type: ignore[override]
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._spelled_as_declared(a) for a in args], namespace)

    def _spelled_as_declared(self, token: str) -> str:
        # --batch_size for --batch-size and the other way round, also in the --flag=value form and in
        # the off switches argparse declares with both characters (--no-readout_trace).
        name, eq, value = token.partition("=")
        if not name.startswith("--") or name in self._option_string_actions:
            return token
        declared = {k.replace("_", "-"): k for k in self._option_string_actions if k.startswith("--")}
        match = declared.get(name.replace("_", "-"))
        return match + eq + value if match else token

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        # One line, not argparse's usage block: bad input is reported like every other error.
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run(main: Callable[[], int]) -> NoReturn:
    """sys.exit(main()), but a reader of stdout that goes away (`| head`) ends the command quietly, with
    the status a shell gives a command SIGPIPE ends, and Ctrl-C or SIGTERM (a scheduler's stop) in one
    line with the status of that signal, instead of Python's traceback (or, at SIGTERM, no word at all)."""
    try:
        with sigterm_interrupts():
            status = main()
            sys.stdout.flush()  # what is still buffered fails here, not at exit
    except BrokenPipeError:
        # Python flushes stdout again at exit: into /dev/null, not the closed pipe (a second traceback).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:
        stop = stopped_by(e)
        print(f"interrupted ({stop.name})", file=sys.stderr, flush=True)
        status = 128 + stop
    sys.exit(status)


def refuse(message: object) -> int:
    """Report bad input as one line on stderr (the message's first) and return the exit status 2."""
    print(f"error: {str(message).splitlines()[0]}", file=sys.stderr)
    return 2


def threads(text: str) -> int:
    """An argparse type: torch's intra-op CPU threads, from 1 to this machine's cores.

    More than the cores only wait on each other (torch crashes at some hundred thousand). The
    count is a setting of the results, not only of speed: sums split over another count of
    threads round in another order.
    """
    cores = os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= cores:
        raise argparse.ArgumentTypeError(f"must be a whole number in [1, {cores}] (this machine's cores), got {text!r}")
    return n


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to `n` inside the block and set back after it (None: left alone).

    A command's --threads lasts as long as the command: run from Python (main(argv) in a notebook),
    it would otherwise set the count of every later run in the process, which no run saves.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _may_set_handlers() -> bool:
    return threading.current_thread() is threading.main_thread()


def handle(signum: int, handler: Callable[[int, Any], Any]) -> None:
    """`handler` for `signum` where Python lets a handler be set, the main thread; elsewhere (a sweep or a run
    started from a notebook's worker thread) the signal keeps the handler it has."""
    if _may_set_handlers():
        signal.signal(signum, handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM, how a scheduler (SLURM, Kubernetes) or `kill` stops a job: a command ends as at Ctrl-C,
    saying so (and how to continue, where it can), rather than at once without a word."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def stopped_by(e: KeyboardInterrupt) -> signal.Signals:
    """The signal that stopped a command: SIGTERM where it raised Terminated, else Ctrl-C's SIGINT."""
    return signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises Terminated inside the block (in the main thread; elsewhere it keeps its handler)."""
    with signal_handlers_kept(signal.SIGTERM):
        handle(signal.SIGTERM, _terminate)
        yield


@contextlib.contextmanager
def signal_handlers_kept(*signums: int) -> Iterator[None]:
    """The handlers of `signums` set back on leaving the block to those it found: what the block installs
    (a command's, Ray Tune's) ends with it, and a notebook that ran it still has its own Ctrl-C and SIGTERM.

    In the main thread only, the one thread that may set a handler; elsewhere a no-op.
    """
    if not _may_set_handlers():
        yield
        return
    before = {n: signal.getsignal(n) for n in signums}
    try:
        yield
    finally:
        for n, handler in before.items():
            if handler is not None:  # None: set outside Python, and Python cannot set it again
                signal.signal(n, handler)


@contextlib.contextmanager
def logs_without(logger: str, keep: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """`logger`'s records that `keep` refuses left out until the block ends: a notebook that ran it (a sweep, a
    collect) logs them again in its later work with Ray and Tune. A filter `logger` had already stays."""
    log = logging.getLogger(logger)
    added = keep not in log.filters
    log.addFilter(keep)
    try:
        yield
    finally:
        if added:
            log.removeFilter(keep)


def named(text: str) -> str:
    """An argparse type: a path or URI, not empty, ~ expanded. An unset shell variable gives "", which would read as
    nothing given (a default taken instead) or as the current folder; the shell leaves ~ in --out=~/x, which would
    name a folder "~" in the current one."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a file or folder, got an empty string")
    return os.path.expanduser(text)


def listed(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    """An argparse type: a comma-separated list of `kind`, repeats dropped, order kept."""
    def parse(text: str) -> tuple:
        try:
            items = [kind(v) for v in text.split(",")]
        except ValueError:
            items = []
        if not items or any(v == "" for v in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        return tuple(dict.fromkeys(items))

    parse.__name__ = f"{kind.__name__} list"
    return parse


# Seconds between a command's progress lines inside a long step (an epoch's batches, a test pass): a line per
# interval keeps a step of minutes visible without flooding a short one, or a cluster's log.
PROGRESS_S = 10.0


class Pace:
    """When a command's next progress line is due: PROGRESS_S after the last line it printed."""

    def __init__(self) -> None:
        self.printed()

    def printed(self) -> None:
        self._last = time.monotonic()

    def due(self) -> bool:
        """Whether a line is due; one that is, the caller prints, and it counts as the last."""
        if time.monotonic() - self._last < PROGRESS_S:
            return False
        self.printed()
        return True


class _Stderr(logging.Handler):
    # sys.stderr is looked up per line, not bound once: a redirection made later (pytest's capture,
    # a notebook's) still receives the lines.
    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def show_progress() -> None:
    """Show the library's progress lines (logger "ndot", INFO) on stderr, as they are, in this process.

    They say what a step that takes minutes is doing (a data set converted once, a wait for another
    process's download); on stderr they stay apart from a command's data on stdout. A library user
    who wants them calls this, or configures the "ndot" logger.
    """
    logger = logging.getLogger("ndot")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
