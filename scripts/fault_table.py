#!/usr/bin/env python
"""What one lost rank costs, per recovery strategy: a markdown table.

    python scripts/fault_table.py --n 4 --steps 40 --fail-step 17 --save-every-steps 10

For each strategy the same training run (digits, mlp) loses worker 1 to SIGKILL at the start
of step --fail-step, and the table reports:

  progress lost   steps whose work was thrown away: recomputed after a restart (fail step
                  minus the last snapshot's step), or dropped by an elastic scheme (the step
                  in flight); the samples the lost worker would still have seen are not counted
  time to recover wall seconds from the failure until a step at or past the failed one
                  starts again (restart: detection, job exit, new job start-up, reloading the
                  snapshot, recomputing the lost steps; elastic: detection, shrinking the
                  communicator, re-sharding)
  rebuild         elastic only: recover_s from the step log (communicator rebuilt, parameters
                  agreed), the part of the above that the scheme itself spends
  final accuracy  held-out accuracy at the end, beside a run without failure

Strategies: ring restarted from its last snapshot (plain mpirun; a lost rank ends the job),
ring --elastic (mpirun --with-ft ulfm --mca btl tcp,self; survivors shrink and go on),
ps-sync restarted from its snapshot, and ps-async under ULFM (the server drops the dead
worker). The parameter-server rows are skipped when `ringtrain train --help` does not list
those backends. Timings on a shared machine are noisy: compare rows, not absolute numbers.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ULFM = ["--with-ft", "ulfm", "--mca", "btl", "tcp,self"]
MARKER = "injected failure at step"


def mpirun(n: int, extra=()) -> list:
    exe = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        sys.exit("no mpirun on PATH")
    cmd = [exe, "-n", str(n), "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + list(extra)


def run(n, args, extra=(), timeout=600):
    """Run `ringtrain train ARGS`; returns (returncode, output, time.time() of the failure line or None)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = mpirun(n, extra) + [sys.executable, "-m", "ringtrain", "train", "--no-progress", *args]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines, t_fail = [], []

    def read():
        for line in proc.stdout:
            if MARKER in line and not t_fail:
                t_fail.append(time.time())
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        lines.append(f"\n(killed after {timeout} s)\n")
    reader.join(10)
    return proc.returncode, "".join(lines), (t_fail[0] if t_fail else None)


def read_rows(run_dir):
    """Every row of every rank and segment: list of dicts with step, t_start, num_workers, recover_s, t_step."""
    import h5py

    rows = []
    for path in sorted(glob.glob(os.path.join(run_dir, "rank-*.h5"))):
        with h5py.File(path, "r", swmr=True) as f:
            cols = {k: f[k][:] for k in ("step", "t_start", "t_step", "num_workers", "recover_s") if k in f}
        n = min(len(v) for v in cols.values())
        for i in range(n):
            rows.append({k: float(v[i]) for k, v in cols.items()} | {"file": os.path.basename(path)})
    return rows


def time_back_at(rows, fail_step, t_fail):
    """Seconds from t_fail until a step >= fail_step that counts (not one dropped by an
    elastic scheme) starts, after t_fail, on any rank."""
    later = [r["t_start"] for r in rows if r["step"] >= fail_step and r["t_start"] > t_fail and not r.get("recover_s", 0) > 0]
    return min(later) - t_fail if later else float("nan")


def accuracy(path):
    try:
        return json.load(open(path))["test_accuracy"]
    except (OSError, ValueError, KeyError):
        return float("nan")


def listed_backends():
    out = subprocess.run([sys.executable, "-m", "ringtrain", "train", "--help"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))).stdout
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4, help="ranks")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--fail-step", type=int, default=17)
    p.add_argument("--fail-rank", type=int, default=1, help="worker rank that is killed")
    p.add_argument("--save-every-steps", type=int, default=10, help="snapshot interval of the restart strategies")
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--work-dir", default=None, help="keep run directories here (default: a temporary directory)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--only", default="reference,ring-restart,ring-elastic,ps-sync,ps-async",
                   help="comma list of the rows to run")
    a = p.parse_args(argv)

    work = a.work_dir or tempfile.mkdtemp(prefix="fault-table-")
    os.makedirs(work, exist_ok=True)
    common = ["--model", a.model, "--batch-size", str(a.batch_size), "--epochs", "100", "--steps", str(a.steps), "--save-every", "0"]
    fail = ["--fail-rank", str(a.fail_rank), "--fail-step", str(a.fail_step), "--fail-mode", "kill"]
    help_text = listed_backends()
    rows, notes = [], []

    def d(name):
        return os.path.join(work, name)

    only = a.only.split(",")

    def restart(backend, label):
        snap = d(f"{backend}.pt")
        args = [*common, "--backend", backend, "--snapshot", snap, "--save-every-steps", str(a.save_every_steps),
                "--run-dir", d(backend), "--json", d(f"{backend}.json")]
        rc1, out1, t_fail = run(a.n, [*args, *fail])
        if t_fail is None or rc1 == 0:
            notes.append(f"{label}: the injected failure did not end the job (exit {rc1}); row left out")
            return
        import torch

        snap_step = int(torch.load(snap, weights_only=True)["STEP"]) if os.path.exists(snap) else 0
        rc2, out2, _ = run(a.n, [*args, "--resume"])
        if rc2 != 0:
            notes.append(f"{label}: the resumed run failed (exit {rc2}): {out2.strip().splitlines()[-1:]}")
            return
        back = time_back_at(read_rows(d(backend)), a.fail_step, t_fail)
        rows.append((label, f"{a.fail_step - snap_step} steps (back to step {snap_step})", f"{back:.1f} s", "-",
                     f"exit {rc1}, then {rc2}", accuracy(d(f"{backend}.json"))))

    def survive(backend, label, flags):
        rc, out, t_fail = run(a.n, [*common, "--backend", backend, *flags, "--run-dir", d(backend + "-ft"),
                                    "--json", d(f"{backend}-ft.json"), *fail], extra=ULFM)
        if t_fail is None or "Summary:" not in out:
            notes.append(f"{label}: the survivors did not finish (exit {rc}): {out.strip().splitlines()[-3:]}")
            return
        r = read_rows(d(backend + "-ft"))
        dropped = sorted({int(x["step"]) for x in r if x.get("recover_s", 0) > 0})
        rebuild = max((x["recover_s"] for x in r if x.get("recover_s", 0) > 0), default=float("nan"))
        back = time_back_at(r, a.fail_step, t_fail)
        rows.append((label, f"{len(dropped)} step(s)" + (f" (step {dropped[0]} dropped)" if dropped else ""),
                     f"{back:.2f} s", f"{rebuild * 1e3:.0f} ms" if dropped else "-", f"exit {rc}", accuracy(d(f"{backend}-ft.json"))))

    if "reference" in only:  # no failure
        rc, out, _ = run(a.n, [*common, "--backend", "ring", "--run-dir", d("ref"), "--json", d("ref.json")])
        rows.append(("ring, no failure", "-", "-", "-", f"exit {rc}", accuracy(d("ref.json"))))
    if "ring-restart" in only:
        restart("ring", "ring, restart from snapshot")
    if "ring-elastic" in only:
        survive("ring", "ring --elastic (ULFM)", ["--elastic"])
    for backend, how in (("ps-sync", "restart"), ("ps-async", "survive")):
        if backend not in only:
            continue
        if backend not in help_text:
            notes.append(f"{backend}: not listed by `ringtrain train --help` in this install; skipped")
            continue
        if how == "restart":
            restart(backend, f"{backend}, restart from snapshot")
        else:
            survive(backend, f"{backend} (ULFM, dead worker dropped)", [])

    table = [
        f"N = {a.n} ranks, {a.model} on digits, batch {a.batch_size}/worker, {a.steps} steps; worker {a.fail_rank} "
        f"SIGKILLed at the start of step {a.fail_step}; snapshots every {a.save_every_steps} steps.",
        "",
        "| strategy | progress lost | time to recover | rebuild (recover_s) | mpirun exit | final accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for label, lost, back, rebuild, rc, acc in rows:
        table.append(f"| {label} | {lost} | {back} | {rebuild} | {rc} | {100 * acc:.1f}% |")
    if notes:
        table += [""] + [f"- {n}" for n in notes]
    text = "\n".join(table) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
