"""`ringtrain report` over real runs, and its messages for bad input."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, ok, train


def report(*args):
    return subprocess.run([sys.executable, "-m", "ringtrain", "report", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    for backend, n in (("ring", 1), ("ring", 2), ("mpi", 2)):
        ok(train(n, "--backend", backend, "--model", "mlp", "--steps", "12", "--run-dir", str(d / f"{backend}-n{n}")))
    return d


def test_report_compares_runs_and_writes_json_and_figures(runs, tmp_path):
    proc = report(runs / "ring-n1", runs / "ring-n2", runs / "mpi-n2", "--json", tmp_path / "r.json", "--plot", tmp_path / "fig")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("t_forward", "t_comm_exposed", "throughput", "cost model", "busbw", "slowest rank", "comparison", "scaling efficiency"):
        assert needle in out, needle
    doc = json.load(open(tmp_path / "r.json"))
    assert len(doc["runs"]) == 3
    ring2 = [r for r in doc["runs"] if r["backend"] == "ring" and r["workers"] == 2][0]
    assert ring2["bytes_sent_per_step"] == pytest.approx(ring2["bytes_expected_per_step"], rel=1e-3)
    eff = [s for s in doc["scaling"] if s["backend"] == "ring" and s["workers"] == 2][0]["efficiency"]
    ring1 = [r for r in doc["runs"] if r["backend"] == "ring" and r["workers"] == 1][0]
    assert eff == pytest.approx(ring2["throughput_samples_per_s"] / (2 * ring1["throughput_samples_per_s"]))
    figs = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert "step_breakdown.png" in figs and "scaling.png" in figs and any(f.startswith("skew-") for f in figs)
    assert all((tmp_path / "fig" / f).stat().st_size > 1000 for f in figs)


def test_not_a_run_directory(tmp_path):
    proc = report(tmp_path)
    assert proc.returncode == 2 and "not a ringtrain run directory" in proc.stderr and "Traceback" not in proc.stderr


def test_half_written_file_is_named_not_a_traceback(tmp_path):
    (tmp_path / "rank-00000.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    proc = report(tmp_path)
    assert proc.returncode == 2 and "rank-00000.h5" in proc.stderr and "Traceback" not in proc.stderr


def test_runs_of_different_models_are_refused(runs, tmp_path):
    ok(train(1, "--model", "cnn", "--steps", "3", "--run-dir", str(tmp_path / "cnn")))
    proc = report(runs / "ring-n1", tmp_path / "cnn")
    assert proc.returncode == 2 and "different models" in proc.stderr


def test_labels_tell_parameter_server_placements_and_ring_buffers_apart():
    from ringtrain.analysis import Run

    def label(**manifest):
        return Run(path="r", manifest=manifest, steps=None).label

    assert label(backend="ring", num_workers=4) == "ring n=4"
    assert label(backend="ring", num_workers=4, scheme_grad_buffers="shared") == "ring n=4"
    assert label(backend="ring", num_workers=2, scheme_grad_buffers="private") == "ring private n=2"
    assert label(backend="ps-sync", num_workers=4, scheme_ps_placement="colocated", scheme_ps_servers=0) == "ps-sync colocated n=4"
    assert label(backend="ps-sync", num_workers=3, scheme_ps_placement="dedicated", scheme_ps_servers=1) == "ps-sync 1 server n=3"
    assert label(backend="ps-async", num_workers=2, scheme_ps_placement="dedicated", scheme_ps_servers=2) == "ps-async 2 servers n=2"
