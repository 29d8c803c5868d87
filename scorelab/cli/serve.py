"""``scorelab serve [--runs DIR] [--host 127.0.0.1] [--port 8000]``: the local web playground.

Lists the runs under DIR, samples from any of them with the options its family declares (the
intermediate x0 predictions streamed as the sampler runs), draws interpolation and traversal
strips, and follows a run in training (loss curve, newest sample grid). Loopback only unless
``--host`` says otherwise; only run folders under DIR are opened; nothing is unpickled.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from .common import UsageError


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="local web playground: sample from runs, watch training",
                       description="A local web playground. " + __doc__.split(":", 1)[1].split("\n\n", 1)[1].strip())
    s.add_argument("--runs", default="runs", help="folder of run folders (default: runs)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only; "
                   "0.0.0.0 makes the runs reachable from other machines)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    s.add_argument("--max-n", type=int, default=64, help="most samples per request for image runs (default 64; "
                   "point runs: 64 times as many)")
    s.add_argument("--max-steps", type=int, default=1000, help="most sampler steps per request (default 1000)")
    s.add_argument("--jobs", type=int, default=1, help="sampling jobs running at once over all runs (default 1; "
                   "each run always runs one at a time, the others wait in line)")
    s.add_argument("--queue", type=int, default=8, help="sampling jobs allowed to wait before requests are refused "
                   "with 429 (default 8)")
    s.add_argument("--open-runs", type=int, default=4, help="runs kept open in memory (default 4)")
    s.add_argument("--precision", choices=["fp32", "bf16"], help="override every run's precision for sampling")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info: one line per request)")


def run(args, rest) -> int:
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    try:
        import starlette  # noqa: F401 - only whether it is installed
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"scorelab serve needs the 'serve' extra ({e.name} is missing): pip install -e '.[serve]'") from None
    from ..serve import Limits, bind, create_app, run_server

    for flag, value, lo in (("--max-n", args.max_n, 1), ("--max-steps", args.max_steps, 1), ("--jobs", args.jobs, 1),
                            ("--queue", args.queue, 0), ("--open-runs", args.open_runs, 1)):
        if value < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {value}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    runs = Path(args.runs)
    if not runs.is_dir():
        raise UsageError(f"--runs {runs}: no such folder (train a run first: scorelab train ... --runs {runs})")
    limits = Limits(n_images=args.max_n, n_points=64 * args.max_n, steps=args.max_steps)
    app = create_app(runs, limits=limits, jobs=args.jobs, queue=args.queue, max_open=args.open_runs,
                     precision=args.precision, host=args.host)
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {args.port} on {args.host} is in use: pick another with --port (0: any free port)") from None
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"scorelab serve: http://{shown}:{port}/  (runs under {runs.resolve()}; Ctrl-C to stop)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"scorelab serve: warning: listening on {args.host}: anyone who can reach this machine can list and "
              "sample your runs", file=sys.stderr, flush=True)
    try:
        run_server(app, sock, log_level=args.log_level)
    finally:
        sock.close()
    return 0
