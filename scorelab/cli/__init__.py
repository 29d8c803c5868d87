"""``scorelab train | sample | eval | interpolate | traverse`` (one module per verb, parsing only).

    scorelab train [CONFIG.yaml | PRESET] [--key value ...] [--runs DIR] [--resume RUN]
    scorelab sample RUN [--n N] [--seed S] [--class K ...] [--out FILE] [family options]
    scorelab eval RUN [--n N] [--nll [--nll-method M ...]]
    scorelab interpolate RUN [--seeds A B] [--n N] [--mode linear|spherical|both] [--space S]
    scorelab traverse RUN [--dims D ...] [--range R]

Every verb asks the run's family what it can do (``Family.capabilities()``); a request it cannot
serve, and any other bad input (a malformed config key, an unknown sampler, a missing run folder,
a corrupt checkpoint, images of the wrong shape), ends with one line on stderr and exit code 2.
An existing run folder is never overwritten without ``--resume``.
"""

from __future__ import annotations

import argparse
import sys

from . import evaluate, interpolate, sample, serve, train, traverse
from .common import UsageError, build, load_data, preset_names, resolve_config, split_overrides

__all__ = ["main", "build_parser", "UsageError", "preset_names", "resolve_config", "build", "load_data", "VERBS"]

VERBS = {"train": train, "sample": sample, "eval": evaluate, "interpolate": interpolate, "traverse": traverse,
         "serve": serve}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scorelab", description="Train, sample and evaluate generative models: diffusion, "
                                "flows, score-based and energy models, and the families they are compared with.")
    sub = p.add_subparsers(dest="command", required=True)
    for verb in VERBS.values():
        verb.add_parser(sub)
    return p


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    from ..data.images import DataError
    from ..families.base import CapabilityError
    from ..train.checkpoint import CheckpointError
    from ..train.config import ConfigError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, rest = split_overrides(argv)
    args, unknown = parser.parse_known_args(argv)
    rest = unknown + rest
    try:
        return VERBS[args.command].run(args, rest)
    except (UsageError, ConfigError, CheckpointError, DataError, CapabilityError) as e:
        print(f"scorelab {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:  # validation inside the library (paths, samplers, nets, shapes)
        print(f"scorelab {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"scorelab {args.command}: error: {where}{e.strerror or _one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
