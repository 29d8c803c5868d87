"""Faults, the long form of ``tests/test_faults.py``: real processes killed, signalled, diverged and
starved of disk, then resumed; every tensor compared bit for bit with a straight run.

    python benchmarks/faults.py                  # ~10-20 min on the shared 2 cores; writes benchmarks/results/faults.json
    python benchmarks/faults.py --kills 4 --signals 4 --jobs 2     # a quick look

The run: the issue's tiny 2-D config (two moons, MLP 32 x 2 with dropout 0.1, EMA, checkpoint
every 5 steps, 300 steps, one thread). A straight run records its full state (weights, EMA, Adam
moments, both random-generator states) after every step. Then, each trial in its own folder:

* **kill -9 at a random moment**: SIGKILL after a uniform delay over a whole straight run's wall
  time from launch (so some land in start-up or in the creation of the run folder);
* **kill -9 inside a checkpoint write**: the process kills itself after the temporary of its n-th
  checkpoint is written and fsynced, before the rename (n uniform in 1..60; n = 1 is the step-0
  checkpoint inside the staging folder);
* **SIGTERM / SIGINT at a random moment of training** (half of each with a second signal 0-50 ms
  later, while the checkpoint is being written): the state saved on the signal must equal the
  straight run's after the same step, random streams included;
* **divergence**: resumed runs at lr 1e2, 1e6, 1e30 and a run whose loss becomes NaN from step 150
  must stop (exit 3) with the last good checkpoint byte for byte;
* **disk full** (a real 4 MB tmpfs (about five checkpoints) mounted in a private user namespace with ``unshare -rm``
  when the kernel allows it, else a per-file size limit, RLIMIT_FSIZE): at start-up, during a
  periodic save, during the save on SIGTERM, and for ``eval``'s JSON and ``sample``'s PNG / npz:
  one line each, no traceback, no temporary left, the checkpoint intact; after space is freed the
  resume ends bit-identical. In the namespace a **read-only run folder** (a read-only bind mount)
  is also tried with ``train --resume``, ``eval`` and ``sample``: one line naming the cause, the
  folder unchanged.

After a kill or a signal the trial resumes (``train --resume``; a fresh ``train`` if no run folder
exists yet: a kill during start-up) until the run finishes, then checks: the final checkpoint
equals the straight one in every tensor; no temporary file is left anywhere under the trial's
runs folder; ``metrics.jsonl`` has no duplicated step and, after kill -9, the same rows as the
straight run (timing columns aside); no traceback in any stderr. The table counts what survived.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIG = {
    "name": "toy",
    "seed": 7,
    "data": {"name": "moons", "options": {"n": 512}},
    "model": {"family": "diffusion", "path": "rf", "prediction": "velocity", "time_sampler": "logit_normal",
              "net": "mlp", "net_options": {"width": 32, "depth": 2, "dropout": 0.1}, "sampler": "euler",
              "sampling_steps": 4},
    "train": {"steps": 300, "batch_size": 64, "lr": 2e-3, "warmup": 20, "log_every": 10, "ckpt_every": 5,
              "sample_every": 0, "ema_decay": 0.99, "precision": "fp32", "device": "cpu", "threads": 1},
}
TIMEOUT = 900  # seconds per process: generous, the machine is shared
TIMING = ("it_s", "ex_s", "elapsed")
PY = [sys.executable]


# --------------------------------------------------------------------------------------
# The driver: one scorelab command with faults injected through the trainer's test hooks
# --------------------------------------------------------------------------------------
def drive(spec: dict, argv: list[str]) -> int:
    """Run ``scorelab argv`` in this process with the faults of ``spec`` (see :func:`launch`)."""
    import torch
    from safetensors.torch import save_file

    import scorelab.train.checkpoint as cm
    import scorelab.train.trainer as tm
    from scorelab.cli import main

    torch.set_num_threads(1)
    st = {"started": False, "fired": False, "writes": 0, "snap": {}}

    def fill() -> None:
        if spec.get("fill_dir"):
            with open(Path(spec["fill_dir"]) / ".filler", "wb", buffering=0) as f:  # until the disk is full
                for size in (65536, 4096, 512, 1):
                    try:
                        while True:
                            f.write(b"\0" * size)
                    except OSError:
                        pass
        else:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (spec.get("fsize", 4096), resource.RLIM_INFINITY))

    def hook(event, tr):
        if event == "step" and not st["started"]:
            st["started"] = True
            if spec.get("marker"):
                Path(spec["marker"]).write_text("started")
            if spec.get("nan_from") is not None:
                real = tr._optimize
                tr._optimize = lambda loss, name: real(loss * float("nan") if tr.step >= spec["nan_from"] else loss, name)
            if spec.get("snapshot"):
                st["snap"].update({f"0/{k}": v.clone() for k, v in tr.state_tensors()[0].items()})
        if spec.get("snapshot") and event == "step_done":
            st["snap"].update({f"{tr.step}/{k}": v.clone() for k, v in tr.state_tensors()[0].items()})
        if spec.get("at") is not None and event == "step_done" and tr.step == spec["at"] and not st["fired"]:
            st["fired"] = True
            for action in spec["actions"]:
                if action == "fill":
                    fill()
                else:
                    os.kill(os.getpid(), getattr(signal, action))

    def write_hook(path):
        if Path(path).name == "checkpoint.safetensors":
            st["writes"] += 1
            if st["writes"] == spec.get("kill_write"):
                os.kill(os.getpid(), signal.SIGKILL)

    tm.EVENT_HOOK = hook
    cm.WRITE_HOOK = write_hook
    if spec.get("fill_now"):
        fill()
    sys.argv = ["scorelab", *argv]
    code = main()  # as the command line calls it (the process's entry point)
    if spec.get("snapshot"):
        save_file(st["snap"], spec["snapshot"])
    return code


def launch(spec: dict, argv: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen(PY + [str(Path(__file__).resolve()), "--drive", json.dumps(spec), "--", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def run_cmd(spec: dict, argv: list[str]) -> tuple[int, str, str]:
    p = launch(spec, argv)
    out, err = p.communicate(timeout=TIMEOUT)
    return p.returncode, out, err


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------
def load(path: Path) -> dict:
    from scorelab.train.checkpoint import load_checkpoint

    return load_checkpoint(path)[0]


def same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name)


def metric_rows(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    if not p.is_file():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in p.read_text().splitlines()]


class Reference:
    """The straight run: its state after every step and its metrics rows."""

    def __init__(self, work: Path):
        from safetensors.torch import load_file

        self.dir = work / "straight"
        snap = work / "straight-states.safetensors"
        t0 = time.perf_counter()
        code, _, err = run_cmd({"snapshot": str(snap)}, train_argv(work, self.dir))
        self.seconds = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"the straight run failed ({code}): {err[-2000:]}")
        flat = load_file(str(snap))
        self.states: dict[int, dict] = {}
        for k, v in flat.items():
            s, name = k.split("/", 1)
            self.states.setdefault(int(s), {})[name] = v
        self.final = load(self.dir / "toy" / "checkpoint.safetensors")
        assert same(self.final, self.states[CONFIG["train"]["steps"]]), "snapshot hook disagrees with the checkpoint"
        self.rows = metric_rows(self.dir / "toy")


def train_argv(work: Path, runs: Path) -> list[str]:
    return ["train", str(work / "config.yaml"), "--runs", str(runs), "--no-progress"]


def finish(work: Path, runs: Path, log: list) -> tuple[bool, int]:
    """Resume (or start again if no folder exists) until the run ends; (finished, attempts). A run
    killed after its final checkpoint (e.g. while drawing its last picture) is finished."""
    for attempt in range(1, 4):
        run = runs / "toy"
        if _step(run / "checkpoint.safetensors") == CONFIG["train"]["steps"]:
            return True, attempt - 1
        argv = ["train", "--resume", str(run), "--no-progress"] if run.is_dir() else train_argv(work, runs)
        code, _, err = run_cmd({}, argv)
        log.append(err)
        if code == 0:
            return True, attempt
    return False, 3


def verdict(ref: Reference, runs: Path, stderrs: list, *, killed: bool) -> dict:
    run = runs / "toy"
    final_ok = (run / "checkpoint.safetensors").is_file() and same(load(run / "checkpoint.safetensors"), ref.final)
    rows = metric_rows(run)
    steps = [r["step"] for r in rows]
    no_dup = steps == sorted(set(steps))
    rows_ok = rows == ref.rows if killed else (no_dup and {r["step"] for r in ref.rows} <= set(steps))
    return {"final_identical": final_ok, "no_temporaries": not temporaries(runs), "temporaries": temporaries(runs),
            "no_duplicate_rows": no_dup, "metrics_ok": rows_ok,
            "no_traceback": not any("Traceback" in e for e in stderrs)}


# --------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------
def kill_trial(ref: Reference, work: Path, i: int, rng: random.Random, aimed: bool) -> dict:
    runs = work / f"kill{i:02d}"
    stderrs = []
    if aimed:
        n = rng.randint(1, 60)
        code, _, err = run_cmd({"kill_write": n}, train_argv(work, runs))
        stderrs.append(err)
        what = f"inside checkpoint write {n}"
    else:
        delay = rng.uniform(0, ref.seconds)
        p = launch({}, train_argv(work, runs))
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=TIMEOUT)
        stderrs.append(err)
        code = p.returncode
        what = f"after {delay:.2f} s"
    left = temporaries(runs) if runs.exists() else []
    folder = (runs / "toy").is_dir()
    at = _step(runs / "toy" / "checkpoint.safetensors")
    done, attempts = finish(work, runs, stderrs) if code != 0 else (True, 0)
    return {"kind": "kill -9 in a write" if aimed else "kill -9 at random", "what": what, "exit": code,
            "killed": code == -9, "folder_after_kill": folder, "checkpoint_step": at, "temporaries_after_kill": left,
            "resumed": done, "attempts": attempts, **verdict(ref, runs, stderrs, killed=True)}


def signal_trial(ref: Reference, work: Path, i: int, rng: random.Random, sig: int, second: bool) -> dict:
    runs = work / f"sig{i:02d}"
    marker = work / f"sig{i:02d}.started"
    p = launch({"marker": str(marker)}, train_argv(work, runs))
    t0 = time.perf_counter()
    while not marker.exists() and p.poll() is None and time.perf_counter() - t0 < TIMEOUT:
        time.sleep(0.01)
    delay = rng.uniform(0, 0.8 * ref.train_seconds)
    time.sleep(delay)
    p.send_signal(sig)
    if second:
        time.sleep(rng.uniform(0, 0.05))
        if p.poll() is None:
            p.send_signal(signal.SIGINT if sig == signal.SIGTERM else signal.SIGTERM)
    _, err = p.communicate(timeout=TIMEOUT)
    code = p.returncode
    stderrs = [err]
    exact, step = None, None
    ck = runs / "toy" / "checkpoint.safetensors"
    if code in (130, 143) and ck.is_file():
        from scorelab.train.checkpoint import load_checkpoint

        t, meta = load_checkpoint(ck)
        step = meta["step"]
        exact = same(t, ref.states[step])
    done, attempts = finish(work, runs, stderrs) if code != 0 else (True, 0)
    name = signal.Signals(sig).name
    return {"kind": f"{name}{' x2' if second else ''}", "what": f"{delay:.2f} s into training", "exit": code,
            "expected_exit": 128 + sig, "stopped_at": step, "saved_state_exact": exact,
            "second_ignored": (not second) or ("ignored: already stopping" in err) or code == 0,
            "resumed": done, "attempts": attempts, **verdict(ref, runs, stderrs, killed=False)}


def divergence_trial(ref: Reference, work: Path, i: int, lr: str | None) -> dict:
    """Resume a good run at step 150 with a huge lr (or with a loss that turns NaN): exit 3, checkpoint byte for byte."""
    import hashlib

    runs = work / f"div{i}"
    run = runs / "toy"
    code, _, err = run_cmd({"at": 150, "actions": ["SIGTERM"]}, train_argv(work, runs))  # a good checkpoint at step 150
    good = hashlib.sha256((run / "checkpoint.safetensors").read_bytes()).hexdigest()
    if lr is not None:
        argv = ["train", "--resume", str(run), "--train.lr", lr, "--no-progress"]
        spec = {}
    else:
        argv = ["train", "--resume", str(run), "--no-progress"]
        spec = {"nan_from": 150}
    code2, _, err2 = run_cmd(spec, argv)
    after = hashlib.sha256((run / "checkpoint.safetensors").read_bytes()).hexdigest()
    last = (err2.strip().splitlines() or [""])[-1]
    return {"kind": "divergence", "what": f"lr {lr}" if lr else "NaN loss from step 150", "exit": code2,
            "good_checkpoint_kept": good == after and code == 143,
            "one_line": last.startswith("scorelab train: stopped: step") and sum(x.startswith("scorelab train:") for x in
                                                                                  err2.splitlines()) == 1,
            "message": last[:240], "no_traceback": "Traceback" not in err + err2, "no_temporaries": not temporaries(runs)}


# --- disk full ------------------------------------------------------------------------------
def tmpfs_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && "
                            "umount $d; rmdir $d"], capture_output=True, timeout=60)
    return probe.returncode == 0


def disk_trials(ref: Reference, work: Path, use_tmpfs: bool) -> list[dict]:
    """The disk-full scenarios, inside a private tmpfs (``unshare -rm``) or under RLIMIT_FSIZE."""
    out = work / "disk-results.json"
    mnt = work / "disk"
    mnt.mkdir(exist_ok=True)
    args = PY + [str(Path(__file__).resolve()), "--inner-disk", str(work), str(mnt), str(out)]
    if use_tmpfs:
        cmd = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=4096k tmpfs '{mnt}' && exec " +
               " ".join(f"'{a}'" for a in args)]
    else:
        cmd = args + ["--rlimit"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=4 * TIMEOUT, cwd=ROOT)
    if not out.is_file():
        raise SystemExit(f"the disk-full scenarios failed: {p.stderr[-3000:]}")
    return json.loads(out.read_text())


def inner_disk(work: Path, mnt: Path, out: Path, rlimit: bool) -> None:
    """Runs inside the namespace: every scenario on ``mnt`` (a 4 MB tmpfs, or any folder with ``rlimit``)."""
    from safetensors.torch import load_file

    base = {"fill_dir": None if rlimit else str(mnt), "fsize": 4096}
    final = {}
    for k, v in load_file(str(work / "straight-final.safetensors")).items():
        final[k] = v
    results = []

    def free() -> None:
        f = mnt / ".filler"
        if f.exists():
            f.unlink()

    def line(err: str) -> str:
        return (err.strip().splitlines() or [""])[-1]

    def record(what, code, err, runs, extra=None, kind="disk full"):
        errors = [x for x in err.strip().splitlines() if x.startswith("scorelab ")]
        results.append({"kind": kind, "what": what, "exit": code, "message": line(err)[:240],
                        "one_line": len(errors) == 1 and "error: " in errors[0] and line(err) == errors[0],
                        "no_traceback": "Traceback" not in err, "no_temporaries": not temporaries(runs) if runs.exists() else True,
                        **(extra or {})})

    # 1. start-up: the disk is full before anything is written
    runs = mnt / "r1"
    code, _, err = run_cmd({**base, "fill_now": True}, train_argv(work, runs))
    free()
    record("start-up (step-0 checkpoint)", code, err, mnt,
           {"no_run_folder": not (runs / "toy").exists(), "expected_exit": 2})
    shutil.rmtree(runs, ignore_errors=True)
    # 2. a periodic save: the disk fills up after step 52, the save at step 55 fails
    runs = mnt / "r2"
    code, _, err = run_cmd({**base, "at": 52, "actions": ["fill"]}, train_argv(work, runs))
    free()
    ck = runs / "toy" / "checkpoint.safetensors"
    intact = _step(ck)
    log = []
    done, _ = finish(work, runs, log)
    record("periodic save", code, err, runs, {"checkpoint_intact_at": intact, "expected_exit": 2,
                                             "resumed_identical": done and same(load(ck), final),
                                             "resume_stderr": [line(e) for e in log]})
    shutil.rmtree(runs, ignore_errors=True)
    # 3. the save on SIGTERM
    runs = mnt / "r3"
    code, _, err = run_cmd({**base, "at": 77, "actions": ["fill", "SIGTERM"]}, train_argv(work, runs))
    free()
    ck = runs / "toy" / "checkpoint.safetensors"
    intact = _step(ck)
    log = []
    done, _ = finish(work, runs, log)
    record("save on SIGTERM", code, err, runs, {"checkpoint_intact_at": intact, "expected_exit": 2,
                                               "resumed_identical": done and same(load(ck), final),
                                               "resume_stderr": [line(e) for e in log]})
    # 4. eval.json and sample outputs on the full disk (the run of 3, finished)
    run = runs / "toy"
    (run / "eval.json").write_text('{"old": true}')
    code, _, err = run_cmd({**base, "fill_now": True}, ["eval", str(run), "--n", "500"])
    free()
    record("eval.json", code, err, runs, {"old_eval_json_intact": (run / "eval.json").read_text() == '{"old": true}',
                                         "expected_exit": 2})
    for name in ("s.png", "s.npz"):
        code, _, err = run_cmd({**base, "fill_now": True}, ["sample", str(run), "--n", "4000", "--out", str(mnt / name)])
        free()
        record(f"sample --out {name}", code, err, mnt, {"no_partial_file": not (mnt / name).exists(), "expected_exit": 2})
    # 5. a read-only run folder (a read-only bind mount: the kernel's EROFS), namespace only
    if not rlimit:
        import hashlib

        def hashes():
            return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}

        ro = subprocess.run(["sh", "-c", f"mount --bind '{run}' '{run}' && mount -o remount,bind,ro '{run}'"],
                            capture_output=True, text=True)
        if ro.returncode == 0:
            before = hashes()
            for what, argv in (("read-only: train --resume", ["train", "--resume", str(run), "--train.steps", "400",
                                                               "--no-progress"]),
                               ("read-only: eval", ["eval", str(run), "--n", "200"]),
                               ("read-only: sample", ["sample", str(run), "--n", "16"])):
                code, _, err = run_cmd({}, argv)
                record(what, code, err, runs, {"expected_exit": 2, "run_unchanged": hashes() == before,
                                               "names_cause": "Read-only file system" in line(err)}, kind="read-only folder")
    out.write_text(json.dumps(results))


def _step(ck: Path):
    """The step of checkpoint ``ck`` (None if there is none; a string if it cannot be read)."""
    from scorelab.train.checkpoint import load_checkpoint

    if not ck.is_file():
        return None
    try:
        return load_checkpoint(ck)[1]["step"]
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"unreadable: {e}"


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------
CHECKS = ("metrics_ok", "second_ignored", "one_line", "no_run_folder", "old_eval_json_intact", "no_partial_file",
          "resumed_identical", "run_unchanged", "names_cause")  # the trial-specific checks (the "other" column)


def table(results: list[dict]) -> str:
    """One row per kind of trial: how many of its trials passed each check (``-``: not applicable)."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["kind"], []).append(r)
        if r["kind"].startswith("kill"):
            r["exit_ok"] = r["exit"] in (-9, 0)  # killed, or finished before the kill
        elif r["kind"] == "divergence":
            r["exit_ok"] = r["exit"] == 3
        else:
            r["exit_ok"] = r["exit"] in (r["expected_exit"], 0)  # 0: the signal came after the end
        if "checkpoint_intact_at" in r:
            r["good_checkpoint_kept"] = isinstance(r["checkpoint_intact_at"], int)
        r["other"] = all(bool(r[k]) for k in CHECKS if k in r)
    cols = [("resumed", "resumed"), ("final ==", "final_identical"), ("saved ==", "saved_state_exact"),
            ("ckpt kept", "good_checkpoint_kept"), ("no tmp", "no_temporaries"), ("no dup", "no_duplicate_rows"),
            ("exit ok", "exit_ok"), ("no tb", "no_traceback"), ("other", "other")]
    head = f"{'trial':<20} {'n':>3} " + " ".join(f"{c:>9}" for c, _ in cols)
    lines = [head, "-" * len(head)]

    def count(rs, key):
        vals = [r.get(key) for r in rs if r.get(key) is not None]
        return f"{sum(bool(v) for v in vals)}/{len(vals)}" if vals else "-"

    for kind, rs in groups.items():
        lines.append(f"{kind:<20} {len(rs):>3} " + " ".join(f"{count(rs, k):>9}" for _, k in cols))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill -9 trials (half at random moments, half inside writes)")
    ap.add_argument("--signals", type=int, default=20, help="SIGTERM / SIGINT trials (alternating)")
    ap.add_argument("--jobs", type=int, default=2, help="trials run at the same time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--no-disk", action="store_true", help="skip the disk-full scenarios")
    args = ap.parse_args()

    from common import header, write_json

    machine = header("faults: kill -9, SIGTERM / SIGINT, divergence and full disks on a 300-step 2-D run")
    work = Path(tempfile.mkdtemp(prefix="scorelab-faults-"))
    (work / "config.yaml").write_text(json.dumps(CONFIG))
    t_all = time.perf_counter()
    ref = Reference(work)
    from safetensors.torch import save_file

    save_file(ref.final, str(work / "straight-final.safetensors"))
    # the training part of a run's wall time (start-up excluded), for the signal delays
    marker = work / "probe.started"
    t0 = time.perf_counter()
    p = launch({"marker": str(marker)}, train_argv(work, work / "probe"))
    while not marker.exists() and p.poll() is None:
        time.sleep(0.01)
    t1 = time.perf_counter()
    p.communicate(timeout=TIMEOUT)
    ref.train_seconds = max(0.2, time.perf_counter() - t1 - 1.0)  # minus the final picture (~1 s)
    print(f"straight run: {ref.seconds:.1f} s wall ({t1 - t0:.1f} s start-up, ~{ref.train_seconds:.1f} s training)", flush=True)

    rng = random.Random(args.seed)
    jobs = []
    for i in range(args.kills):
        jobs.append(("kill", i, random.Random(rng.random()), i % 2 == 1))
    for i in range(args.signals):
        sig = signal.SIGTERM if i % 2 == 0 else signal.SIGINT
        jobs.append(("signal", i, random.Random(rng.random()), (sig, (i // 2) % 2 == 1)))
    lock = threading.Lock()
    results = []

    def do(job):
        kind, i, r, extra = job
        res = kill_trial(ref, work, i, r, aimed=extra) if kind == "kill" else signal_trial(ref, work, i, r, *extra)
        with lock:
            results.append(res)
            ok = res.get("final_identical") and res.get("no_temporaries") and res.get("no_traceback")
            print(f"  {res['kind']:<20} {res['what']:<26} exit {res['exit']:>4}  {'ok' if ok else 'FAILED ' + json.dumps(res)}",
                  flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        list(ex.map(do, jobs))
    for i, lr in enumerate(("1e2", "1e6", "1e30", None)):
        res = divergence_trial(ref, work, i, lr)
        results.append(res)
        print(f"  divergence {res['what']:<24} exit {res['exit']}  kept {res['good_checkpoint_kept']}  {res['message'][:110]}",
              flush=True)
    disk_mode = None
    if not args.no_disk:
        disk_mode = "tmpfs (unshare -rm)" if tmpfs_available() else "RLIMIT_FSIZE"
        for res in disk_trials(ref, work, disk_mode.startswith("tmpfs")):
            results.append(res)
            print(f"  {res['kind']} ({disk_mode}) {res['what']:<28} exit {res['exit']}: {res['message'][:120]}", flush=True)

    order = {"kill -9 at random": 0, "kill -9 in a write": 1}
    results.sort(key=lambda r: (order.get(r["kind"], 2), r["kind"]))
    print()
    print(table(results))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; disk full via {disk_mode}")
    write_json("faults.json", {"config": CONFIG, "straight_seconds": ref.seconds, "disk_mode": disk_mode,
                               "results": results, "table": table(results)}, machine)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder kept: {work}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--drive":
        spec = json.loads(sys.argv[2])
        sys.exit(drive(spec, sys.argv[4:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--inner-disk":
        inner_disk(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), rlimit="--rlimit" in sys.argv)
        sys.exit(0)
    main()
