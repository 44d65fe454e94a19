"""The README's commands, run as written (at toy scale where the README's sizes are large)."""
import json
import os
import subprocess

from conftest import ROOT, ok, run_mpi


def test_demo_script_trains_logs_and_reports(tmp_path):
    env = dict(os.environ, RUN_DIR=str(tmp_path / "demo"))
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Total img/sec on 4 rank(s)" in proc.stdout and "held-out accuracy" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "demo").glob("rank-*.h5")) == [f"rank-{r:05d}.h5" for r in range(4)]
    assert (tmp_path / "demo" / "figures" / "step_breakdown.png").stat().st_size > 1000


def test_benchmark_commands_at_toy_scale(tmp_path):
    proc = ok(run_mpi(2, ["-m", "ringtrain", "bench", "allreduce", "--backends", "ring,mpi,gloo", "--sizes", "1K,64K",
                          "--iters", "3", "--chunk-bytes", "16K", "--json", str(tmp_path / "b.json")]))
    rows = json.load(open(tmp_path / "b.json"))
    assert {r["backend"] for r in rows} == {"ring", "mpi", "gloo"} and all(r["wrong"] == 0 for r in rows)
    # Per-iteration times travel with the rows, and the ratios printed come from them.
    assert all(len(r["times_s"]) == 3 and r["time_s"] == sorted(r["times_s"])[1] for r in rows)
    by = {(r["backend"], r["size_bytes"]): r for r in rows}
    ring, mpi = by[("ring", 65536)], by[("mpi", 65536)]
    paired = sorted(m / g for m, g in zip(mpi["times_s"], ring["times_s"]))[1]
    assert f"ring/mpi {ring['busbw_GBps'] / mpi['busbw_GBps']:.2f} (paired {paired:.2f} [" in proc.stdout
    proc = ok(run_mpi(2, ["-m", "ringtrain", "bench", "train", "--backends", "ring,ring+nolog,ring+private,mpi,ddp", "--model", "mlp",
                          "--synthetic-shape", "1,8,8", "--rounds", "2", "--steps-per-round", "2"]))
    assert "samples/s ring / ddp" in proc.stdout
