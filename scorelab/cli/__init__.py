"""``scorelab train | sample | eval | interpolate | traverse`` (one module per verb, parsing only).

    scorelab train [CONFIG.yaml | PRESET] [--key value ...] [--runs DIR] [--resume RUN]
    scorelab sample RUN [--n N] [--seed S] [--class K ...] [--out FILE] [family options]
    scorelab eval RUN [--n N] [--nll [--nll-method M ...]]
    scorelab interpolate RUN [--seeds A B] [--n N] [--mode linear|spherical|both] [--space S]
    scorelab traverse RUN [--dims D ...] [--range R]

Every verb asks the run's family what it can do (``Family.capabilities()``); a request it cannot
serve, and any other bad input (a malformed config key, an unknown sampler, a missing run folder,
a corrupt checkpoint, images of the wrong shape, a usage error), ends with one line on stderr.
An existing run folder is never overwritten without ``--resume``.

Exit codes:

===  ==========================================================================================
0    done
2    refused or failed, with one line naming the problem: bad input, a file that cannot be
     written or read (disk full, permission denied, read-only folder: the line names the file
     and the cause; nothing is half-written), an error inside training (the run keeps its last
     checkpoint), weights that give non-finite output
3    ``train`` stopped by the divergence guard (non-finite or exploding loss); the last good
     checkpoint is kept byte for byte
130  stopped by SIGINT (Ctrl-C); ``train`` first saves the checkpoint of the last finished step
143  stopped by SIGTERM (likewise)
===  ==========================================================================================

``SCORELAB_DEBUG=1`` in the environment re-raises these errors with their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import evaluate, interpolate, sample, serve, train, traverse
from .common import UsageError, build, load_data, preset_names, resolve_config, split_overrides

__all__ = ["main", "build_parser", "UsageError", "preset_names", "resolve_config", "build", "load_data", "VERBS",
           "EXIT_ERROR", "EXIT_DIVERGED"]

VERBS = {"train": train, "sample": sample, "eval": evaluate, "interpolate": interpolate, "traverse": traverse,
         "serve": serve}
EXIT_ERROR = 2  # one-line error
EXIT_DIVERGED = 3  # the divergence guard stopped training


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as :class:`UsageError` (one line, exit 2) instead of usage text + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scorelab", description="Train, sample and evaluate generative models: diffusion, "
                "flows, score-based and energy models, and the families they are compared with.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for verb in VERBS.values():
        verb.add_parser(sub)
    return p


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _verb(argv: list[str]) -> str:
    return next((a for a in argv if a in VERBS), "")


def main(argv: list[str] | None = None) -> int:
    try:
        from ..data.images import DataError
        from ..families.base import CapabilityError
        from ..train.checkpoint import CheckpointError, StorageError
        from ..train.config import ConfigError
        from ..train.trainer import DivergedError
    except KeyboardInterrupt:
        print("scorelab: interrupted by SIGINT", file=sys.stderr)
        return 130

    entry_point = argv is None  # called as the process's command (sys.argv), not by other Python code
    argv = list(sys.argv[1:] if argv is None else argv)
    name = f"scorelab {_verb(argv)}".strip()
    debug = bool(os.environ.get("SCORELAB_DEBUG"))
    try:
        parser = build_parser()
        argv, rest = split_overrides(argv)
        args, unknown = parser.parse_known_args(argv)
        name = f"scorelab {args.command}"
        args.entry_point = entry_point
        return VERBS[args.command].run(args, list(unknown) + list(rest))
    except DivergedError as e:
        if debug:
            raise
        print(f"{name}: stopped: {_one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    except (UsageError, ConfigError, CheckpointError, DataError, CapabilityError, ValueError) as e:
        # ValueError: validation inside the library (paths, samplers, nets, shapes)
        if debug:
            raise
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except StorageError as e:
        if debug:
            raise
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{name}: error: {where}{e.strerror or _one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:
        from ..train.trainer import Interrupted

        signum = int(getattr(e, "signum", 2))
        when = " during start-up: nothing was written" if isinstance(e, Interrupted) and name == "scorelab train" else ""
        print(f"{name}: interrupted by {'SIGTERM' if signum == 15 else 'SIGINT'}{when}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
