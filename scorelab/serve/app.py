"""The playground's web app (Starlette): one page and the JSON API behind it.

=======================  ===================================================================
``GET /``                the page (``static/index.html``, plain HTML/JS/CSS, no build step)
``GET /api/runs``        every run under DIR: family, dataset, step / steps, status, eval numbers
``GET /api/run?run=R``   one run: capabilities, the sample options its family declares (kind,
                         default, bounds, choices), class names, limits
``POST /api/sample``     JSON ``{run, n, seed, class, sampler, steps, grid, cfg, ...}`` -> ``image/png``
``POST /api/sample/stream``  the same body -> ``application/x-ndjson``: ``queued``, ``start``, one
                         ``step`` event per sampler step (``i``, ``t`` and the grid of the current
                         x0 prediction as a PNG data URL, at most every ``frame_interval`` s),
                         then ``done`` with the final grid, or ``error``
``POST /api/interpolate``  ``{run, seeds: [a, b], n, mode, space, sampler, steps, class}`` -> PNG strip
``POST /api/traverse``   ``{run, dims, range, n, index}`` -> PNG, one row per latent dimension
``GET /api/metrics?run=R&after=B``  rows of ``metrics.jsonl`` from byte ``B`` on, the run's status
``GET /api/picture?run=R``  the newest sample grid the trainer wrote (``samples/step_*.png``)
=======================  ===================================================================

Errors are JSON ``{"error": message, "status": code}``: 400 a bad field (named), 403 a path
outside DIR, 404 an unknown run, 409 a run being written, 413 a body too large, 415 not JSON,
422 a run that cannot be opened or gives non-finite samples, 429 too many jobs waiting. A request
whose Host (or, on a POST, Origin) is not this server's loopback name is refused (a web page
elsewhere cannot drive the server through DNS rebinding), and a POST must be
``application/json`` (so a cross-site form cannot start jobs).

Sampling jobs run in worker threads: one at a time per run (others wait in line, in order),
``jobs`` at a time in all, and at most ``queue`` waiting before a 429.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from .params import Limits, api_words, option_specs, page_options, parse_interpolate, parse_sample, parse_traverse
from .render import grid_rows, point_bounds, samples_png
from .store import METRICS, ApiError, RunStore

__all__ = ["create_app", "Jobs", "STATIC", "LOOPBACK"]

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
METRICS_CHUNK = 4 << 20  # bytes of metrics.jsonl returned per request


# --------------------------------------------------------------------------------------
# Jobs: one at a time per run, a few at a time in all, a bounded line
# --------------------------------------------------------------------------------------
class Jobs:
    """Admission of sampling jobs. ``concurrent``: jobs running at once over all runs; ``queue``:
    jobs allowed to wait before new ones are refused (429). Each run runs one job at a time;
    waiting jobs of a run start in the order they came (asyncio locks are fair)."""

    def __init__(self, concurrent: int = 1, queue: int = 8):
        self.concurrent, self.queue = max(1, int(concurrent)), max(0, int(queue))
        self._slots = asyncio.Semaphore(self.concurrent)
        self._locks: dict = {}
        self._per_run: dict = {}  # key -> jobs waiting or running on that run
        self.waiting = 0
        self.running = 0

    def ahead(self, key) -> int:
        """Jobs before a new one: those of the same run, or all running when every slot is taken."""
        return max(self._per_run.get(key, 0), self.running if self._slots.locked() else 0)

    async def acquire(self, key):
        """Wait for a slot for run ``key``; returns ``release()`` (call once, when the job's thread ends)."""
        if self.waiting >= self.queue and (self._slots.locked() or self._per_run.get(key, 0)):
            raise ApiError(429, f"the server is busy: {self.waiting} sampling jobs are waiting (try again shortly)")
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._per_run[key] = self._per_run.get(key, 0) + 1
        self.waiting += 1
        got_lock = got_slot = False
        try:
            await lock.acquire()
            got_lock = True
            await self._slots.acquire()
            got_slot = True
        finally:
            self.waiting -= 1
            if not got_slot:
                self._per_run[key] -= 1
                if got_lock:
                    lock.release()
        self.running += 1
        done = []

        def release() -> None:
            if done:
                return
            done.append(True)
            self.running -= 1
            self._per_run[key] -= 1
            self._slots.release()
            lock.release()

        return release

    def status(self) -> dict:
        return {"running": self.running, "waiting": self.waiting, "concurrent": self.concurrent, "queue": self.queue}


class _Cancelled(Exception):
    """Raised inside the sampler's callback when the client has gone away."""


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _as_api_error(e: BaseException) -> ApiError:
    """Library errors in the API's terms: bad values (ValueError and its kin: config, capability,
    data, usage errors) are 400; unreadable files 409; anything else 500."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ValueError):
        return ApiError(400, api_words(_line(e)))
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return ApiError(409, f"{where}{e.strerror or _line(e)}")
    print("scorelab serve: internal error:\n" + "".join(traceback.format_exception(e)), file=sys.stderr)
    return ApiError(500, f"internal error: {type(e).__name__}: {_line(e)}")


def _error_response(e: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": e.message, "status": e.status}, status_code=e.status)


async def _read_json(request, limit: int):
    """The request's JSON body (415 unless JSON, 413 past ``limit`` bytes, 400 when malformed)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "send the request body as JSON (Content-Type: application/json)")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {int(length)} bytes: at most {limit} are accepted")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
    if not data:
        raise ApiError(400, "the request body is empty: send a JSON object such as {\"run\": \"NAME\"}")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None


def _host_of(value: str) -> str:
    """The host name of a Host header / Origin (port and scheme removed, IPv6 brackets kept off)."""
    v = value.strip().lower()
    if "://" in v:
        v = v.split("://", 1)[1]
    v = v.split("/", 1)[0]
    if v.startswith("["):
        return v[1:].split("]", 1)[0]
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


class _HostGuard:
    """ASGI middleware: refuse requests whose Host, or Origin when there is one, is not allowed."""

    def __init__(self, app, allowed: tuple | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            host = _host_of(headers.get("host", ""))
            origin = headers.get("origin")
            bad = None
            if host not in self.allowed:
                bad = f"Host {headers.get('host', '')!r}"
            elif origin and origin != "null" and _host_of(origin) not in self.allowed:
                bad = f"Origin {origin!r}"
            if bad:
                resp = _error_response(ApiError(403, f"{bad} is not this server: the playground answers requests to "
                                                     f"{', '.join(self.allowed)} only"))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------
def create_app(runs_dir, *, limits: Limits | None = None, jobs: int = 1, queue: int = 8, max_open: int = 4,
               precision: str | None = None, host: str = "127.0.0.1", allowed_hosts: tuple | None = None,
               frame_interval: float = 0.1):
    """The Starlette app serving the runs under ``runs_dir``.

    ``limits``: request sizes (:class:`~scorelab.serve.params.Limits`). ``jobs``: sampling jobs at
    once over all runs (each run: one at a time). ``queue``: jobs that may wait. ``max_open``: runs
    kept open (weights in memory). ``precision``: sampling precision override (None: each run's).
    ``host``: the address the server binds; on loopback only loopback Host / Origin names are
    answered, elsewhere (``0.0.0.0``) any. ``allowed_hosts``: that list, explicitly.
    ``frame_interval``: seconds between streamed intermediate pictures (0: every step).
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    store = RunStore(runs_dir, max_open=max_open, precision=precision)
    limits = limits or Limits()
    if allowed_hosts is None and host in LOOPBACK:
        allowed_hosts = tuple(dict.fromkeys((*LOOPBACK, host)))
    bounds_cache: dict = {}
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.jobs = state["jobs"] = Jobs(jobs, queue)  # asyncio primitives belong to the serving loop
        yield

    def jobs_() -> Jobs:
        if "jobs" not in state:
            state["jobs"] = Jobs(jobs, queue)
        return state["jobs"]

    def endpoint(fn):
        async def wrapped(request):
            try:
                return await fn(request)
            except Exception as e:  # noqa: BLE001 - every failure is a JSON error; the server keeps serving
                return _error_response(_as_api_error(e))

        return wrapped

    def classifier_runs() -> list[str]:
        from ..families import FAMILIES

        out = []
        for s in store.summaries():
            cls = FAMILIES.get(s.get("family") or "")
            if cls is not None and cls.declared is not None and cls.declared.classify and s.get("step") is not None:
                out.append(s["name"])
        return out

    def run_name(request) -> str:
        name = request.query_params.get("run")
        if not name:
            raise ApiError(400, "give the run as ?run=NAME (see GET /api/runs)")
        return name

    # --- pages and lists ----------------------------------------------------------------
    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @endpoint
    async def api_runs(request):
        runs = await run_in_threadpool(store.summaries)
        return JSONResponse({"root": str(store.root), "runs": runs, "jobs": jobs_().status(),
                             "limits": asdict(limits)})

    def run_info(name: str) -> dict:
        r = store.open(name)
        fam, caps = r.family, r.family.capabilities()
        folder = store.folder(name)
        info = store.summary(folder)
        data = r.data
        classes = []
        if data.conditional_classes:
            names = data.class_names or ()
            classes = [{"index": i, "name": names[i] if i < len(names) else str(i)} for i in range(data.conditional_classes)]
        c = asdict(caps)
        c["sample_options"] = page_options(r)
        info.update(
            capabilities=c,
            options=option_specs(r, limits, classifier_runs() if "classifier" in c["sample_options"] else []),
            classes=classes,
            data={"name": data.name, "shape": list(data.shape), "images": data.images, "domain": data.domain},
            limits={"n": limits.max_n(data.images), "steps": limits.steps, "strip": limits.strip, "dims": limits.dims},
            defaults={"n": 16 if data.images else 1000, "seed": 0},
            precision="bf16" if fam.autocast_dtype is not None else "fp32",
        )
        if caps.interpolate:
            from ..interpolation import MODES
            from ..samplers import DETERMINISTIC

            info["interpolation"] = {"spaces": list(caps.interpolate), "modes": [*MODES, "both"],
                                     "samplers": list(DETERMINISTIC) if caps.denoiser else []}
        return info

    @endpoint
    async def api_run(request):
        return JSONResponse(await run_in_threadpool(run_info, run_name(request)))

    # --- sampling -----------------------------------------------------------------------
    def points_backdrop(r):
        """(bounds, reference points) of a point run: its held-out data, cached per run folder."""
        key = Path(r.path).resolve()
        if key not in bounds_cache:
            try:
                from ..eval import reference_set

                ref = reference_set(r.cfg, 2000).x.float()
                bounds_cache[key] = (point_bounds(ref), ref)
            except Exception:  # noqa: BLE001 - without the data the samples set their own range
                bounds_cache[key] = (None, None)
        return bounds_cache[key]

    def picture(r, x, nrow=None, scale=2) -> bytes:
        if r.data.images:
            return samples_png(x, nrow=nrow, scale=scale)
        bounds, ref = points_backdrop(r)
        return samples_png(x, bounds=bounds, reference=ref)

    def open_for(body):
        """The run a POST body names (400 unless the body is a JSON object)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object such as {\"run\": \"NAME\", \"n\": 16}")
        return store.open(body.get("run"))

    def prepare_sample(body):
        r = open_for(body)
        req = parse_sample(body, r, store, limits)
        if not r.data.images:
            points_backdrop(r)
        return r, req

    def draw_sample(r, req, callback=None):
        import torch

        opts = dict(req.options)
        if callback is not None and "callback" in r.family.capabilities().sample_options:
            opts["callback"] = callback
        with torch.no_grad():
            x = r.family.sample(r.modules, req.n, seed=req.seed, y=req.y, **opts)
        if not torch.isfinite(x).all():
            raise ApiError(422, "the model generated non-finite values: its weights are broken (diverged training?)")
        return x

    async def job(key, fn, *args):
        """Run ``fn(*args)`` in a worker thread once this run's turn comes; the slot is held until it ends."""
        release = await jobs_().acquire(key)
        task = asyncio.ensure_future(run_in_threadpool(fn, *args))
        task.add_done_callback(lambda _: release())
        return await asyncio.shield(task)

    @endpoint
    async def api_sample(request):
        body = await _read_json(request, limits.body)
        r, req = await run_in_threadpool(prepare_sample, body)
        t0 = time.perf_counter()

        def work():
            x = draw_sample(r, req)
            return picture(r, x, grid_rows(req.n, req.n_classes), req.scale)

        data = await job(Path(r.path).resolve(), work)
        return Response(data, media_type="image/png", headers={
            "X-Seconds": f"{time.perf_counter() - t0:.3f}", "X-Run-Step": str(r.step), "X-N": str(req.n),
            "Cache-Control": "no-store"})

    @endpoint
    async def api_sample_stream(request):
        body = await _read_json(request, limits.body)
        r, req = await run_in_threadpool(prepare_sample, body)
        key = Path(r.path).resolve()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        nrow = grid_rows(req.n, req.n_classes)
        last = [0.0]

        def callback(info: dict) -> None:
            if cancel.is_set():
                raise _Cancelled()
            now = time.monotonic()
            i = int(info.get("i", 0))
            if i > 0 and now - last[0] < frame_interval:
                return
            last[0] = now
            frame = info.get("x0", info.get("x"))
            ev = {"event": "step", "i": i, "steps": req.steps, "kind": "x0" if "x0" in info else "x"}
            t = info.get("t")
            if t is not None:
                try:
                    ev["t"] = float(t)
                except (TypeError, ValueError):
                    pass
            if frame is not None:
                ev["image"] = _data_url(picture(r, frame.detach().float().cpu(), nrow, req.scale))
            loop.call_soon_threadsafe(events.put_nowait, ev)

        def work():
            x = draw_sample(r, req, callback)
            return picture(r, x, nrow, req.scale)

        async def stream():
            t0 = time.perf_counter()
            try:
                ahead = jobs_().ahead(key)
                if ahead:
                    yield _ndjson({"event": "queued", "ahead": ahead})
                release = await jobs_().acquire(key)
                task = asyncio.ensure_future(run_in_threadpool(work))  # from here the task's end releases the slot
                task.add_done_callback(lambda _: release())
                yield _ndjson({"event": "start", "steps": req.steps, "n": req.n, "run_step": r.step,
                               "waited": round(time.perf_counter() - t0, 3)})
                while True:
                    getter = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        yield _ndjson(getter.result())
                        continue
                    getter.cancel()
                    while not events.empty():
                        yield _ndjson(events.get_nowait())
                    break
                png = task.result()
                yield _ndjson({"event": "done", "image": _data_url(png), "n": req.n, "run_step": r.step,
                               "seconds": round(time.perf_counter() - t0, 3)})
            except ApiError as e:
                yield _ndjson({"event": "error", "status": e.status, "error": e.message})
            except Exception as e:  # noqa: BLE001 - reported in the stream; the server keeps serving
                err = _as_api_error(e)
                yield _ndjson({"event": "error", "status": err.status, "error": err.message})
            finally:
                cancel.set()  # the client left or the job ended: the sampler stops at its next step

        return StreamingResponse(stream(), media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})

    @endpoint
    async def api_interpolate(request):
        import torch

        body = await _read_json(request, limits.body)

        def prepare():
            r = open_for(body)
            return r, parse_interpolate(body, r, limits)

        r, p = await run_in_threadpool(prepare)

        def work():
            from ..interpolation import interpolate_noise

            fam = r.family
            with torch.no_grad():
                z = fam.latents(r.modules, p["seeds"], p["space"], y=p["y"])
                path = torch.cat([interpolate_noise(z[0], z[1], p["n"], m) for m in p["modes"]])
                y = p["y"].expand(len(path)) if p["y"] is not None else None
                x = fam.generate_from(r.modules, path, p["space"], y=y, **p["options"])
            if not torch.isfinite(x).all():
                raise ApiError(422, "the model generated non-finite values: its weights are broken")
            return picture(r, x, p["n"], p["scale"])

        data = await job(Path(r.path).resolve(), work)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store", "X-Modes": ",".join(p["modes"])})

    @endpoint
    async def api_traverse(request):
        import torch

        body = await _read_json(request, limits.body)

        def prepare():
            r = open_for(body)
            return r, parse_traverse(body, r, limits)

        r, p = await run_in_threadpool(prepare)

        def work():
            from ..eval import reference_set

            ref = reference_set(r.cfg, p["index"] + 1)
            if p["index"] >= len(ref.x):
                raise ApiError(400, f"'index' {p['index']} is beyond the {len(ref.x)} held-out examples")
            with torch.no_grad():
                x = r.family.traverse(r.modules, ref.x[p["index"] : p["index"] + 1], p["dims"], p["span"], p["n"])
            return picture(r, x, p["n"], p["scale"])

        data = await job(Path(r.path).resolve(), work)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    # --- the training view --------------------------------------------------------------
    def metrics_since(name: str, after: int) -> dict:
        folder = store.folder(name)
        p = store.file(name, METRICS)
        info = store.summary(folder)
        rows, nxt, reset = [], 0, False
        if p.is_file():
            size = p.stat().st_size
            if after > size:  # the file was truncated (a resume rewrote it): start again
                after, reset = 0, True
            with open(p, "rb") as f:
                f.seek(after)
                chunk = f.read(METRICS_CHUNK)
            end = chunk.rfind(b"\n") + 1  # only complete lines: the trainer may be writing the next one
            for line in chunk[:end].splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    rows.append({k: v for k, v in rec.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)})
            nxt = after + end
        return {"run": name, "rows": rows, "next": nxt, "reset": reset, "status": info["status"], "step": info["step"],
                "steps": info["steps"], "latest_picture": info["latest_picture"], "updated": info["updated"]}

    @endpoint
    async def api_metrics(request):
        raw = request.query_params.get("after", "0")
        if not raw.isdigit():
            raise ApiError(400, f"'after' must be a byte offset (a non-negative integer), got {raw!r}")
        return JSONResponse(await run_in_threadpool(metrics_since, run_name(request), int(raw)))

    @endpoint
    async def api_picture(request):
        name = run_name(request)

        def find():
            p = store.latest_picture(store.folder(name))
            if p is None:
                raise ApiError(404, f"run {name!r} has no sample picture yet (the trainer writes one every "
                                    "train.sample_every steps)")
            return p.read_bytes(), p.name

        data, fname = await run_in_threadpool(find)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store", "X-Picture": fname})

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(status, str(getattr(exc, "detail", exc)))
        return _error_response(ApiError(status, msg))

    routes = [
        Route("/", index),
        Route("/api/runs", api_runs),
        Route("/api/run", api_run),
        Route("/api/sample", api_sample, methods=["POST"]),
        Route("/api/sample/stream", api_sample_stream, methods=["POST"]),
        Route("/api/interpolate", api_interpolate, methods=["POST"]),
        Route("/api/traverse", api_traverse, methods=["POST"]),
        Route("/api/metrics", api_metrics),
        Route("/api/picture", api_picture),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found},
                    middleware=[Middleware(_HostGuard, allowed=allowed_hosts)])
    app.state.store = store
    app.state.limits = limits
    return app


def _ndjson(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def bind(host: str, port: int):
    """A listening TCP socket on ``host:port`` (``port`` 0: any free port)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def run_server(app, sock, *, log_level: str = "warning") -> None:
    """Serve ``app`` on the bound socket ``sock`` with uvicorn until Ctrl-C / SIGTERM."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"), lifespan="on",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
