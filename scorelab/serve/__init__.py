"""``scorelab serve``: a local web playground over a folder of runs.

One page (``static/``: plain HTML, JavaScript and CSS, no build step) and the JSON API behind it
(:mod:`scorelab.serve.app`): the run list with eval numbers, sampling with the options each run's
family declares and the sampler's intermediate x0 predictions streamed as they form, interpolation
and traversal strips where the family has them, and a live view of a run in training. Loopback
only unless told otherwise; only run folders under the runs directory are opened
(:mod:`scorelab.serve.store`); request sizes are bounded (:mod:`scorelab.serve.params`); nothing
is unpickled. Needs the ``serve`` extra (starlette, uvicorn).
"""

from .app import bind, create_app, run_server
from .params import Limits
from .store import ApiError, RunStore

__all__ = ["create_app", "bind", "run_server", "Limits", "ApiError", "RunStore"]
