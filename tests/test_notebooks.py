"""Every notebook in analysis/ runs headless against real runs and writes its figures.

The session fixture trains toy runs for real under mpirun (an MLP on the digits data, a
dozen steps: none at N=1, ring and mpi at N=2, ring at N=3, and the parameter-server
schemes when they are installed) and writes an all-reduce benchmark JSON. Every notebook is
then executed with those paths injected as parameters; any cell error fails the test.

    pytest tests/test_notebooks.py        # about 2-3 minutes on 2 cores
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import nbformat
import pytest

from conftest import mpi_env, mpirun_prefix
from ringtrain import analysis
from ringtrain.notebooks import NotebookError, execute_notebook, inject_parameters, main as notebooks_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "analysis", "*.ipynb")))
TRAIN_TIMEOUT_S = 400
STEPS = 12

# Figures each notebook must write (glob patterns inside FIG_DIR).
EXPECTED_FIGURES = {
    "01_step_breakdown": ["step_breakdown.png", "rank_breakdown-*.png", "timeline-ring-n2.png", "timeline-ring-n3.png"],
    "02_ring_vs_ps": ["ring_vs_ps_step_time.png", "scaling_efficiency.png", "bytes_measured_vs_predicted.png", "accuracy_vs_time.png"],
    "03_allreduce_bandwidth": ["allreduce_bandwidth.png"],
    "04_stragglers": ["arrival_skew-ring-n2.png", "skew_over_steps-mpi-n2.png"],
}


def _env():
    # More ranks than cores: yield the core instead of spinning while waiting for a peer.
    return mpi_env(OMPI_MCA_mpi_yield_when_idle=1)


def _mpirun(n):
    return mpirun_prefix(n) + [sys.executable, "-m", "ringtrain"]


def _training_specs():
    """(backend, ranks) pairs to train: the all-reduce schemes always, PS ones when installed."""
    from ringtrain.schemes import scheme_names

    specs = [("none", 1), ("ring", 2), ("mpi", 2), ("ring", 3)]
    names = scheme_names()
    for ps in ("ps-sync", "ps-async"):
        if ps in names:
            specs.append((ps, 3))  # 2 workers and a server under the scheme's default layout
    return specs


def _fake_bench_rows():
    """Rows shaped like `bench allreduce --json` (DESIGN §4), from a known alpha-beta model."""
    rows = []
    for backend, alpha, bw in (("ring", 40e-6, 2e9), ("mpi", 15e-6, 4e9)):
        for size in (4 << 10, 64 << 10, 1 << 20, 16 << 20):
            t = alpha + size / bw
            rows.append({"backend": backend, "nranks": 2, "size_bytes": size, "time_s": t,
                         "algbw_GBps": size / t / 1e9, "busbw_GBps": size / t / 1e9, "wrong": 0})
    return rows


@pytest.fixture(scope="session")
def run_root(tmp_path_factory):
    """Real toy trainings (concurrently: startup dominates) and a bench JSON in one folder."""
    root = tmp_path_factory.mktemp("runs")
    procs = []
    for backend, n in _training_specs():
        run_dir = root / f"{backend}-n{n}"
        cmd = _mpirun(n) + ["train", "--backend", backend, "--model", "mlp", "--dataset", "digits", "--steps", str(STEPS),
                            "--batch-size", "32", "--threads", "1", "--run-dir", str(run_dir), "--no-progress"]
        log = open(root / f"{backend}-n{n}.log", "w")
        procs.append((backend, n, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT), log))
    bench_json = root / "bench.json"
    bench_proc = None
    if importlib.util.find_spec("ringtrain.bench") is not None:
        cmd = _mpirun(2) + ["bench", "allreduce", "--backends", "ring,mpi", "--sizes", "4K,64K,1M", "--iters", "5", "--json", str(bench_json)]
        bench_proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
        assert bench_proc.returncode == 0, f"bench allreduce failed:\n{bench_proc.stdout[-2000:]}\n{bench_proc.stderr[-2000:]}"
    else:  # the benchmark command is not in this tree yet: rows of the same shape
        bench_json.write_text(json.dumps(_fake_bench_rows()))
    for backend, n, p, log in procs:
        try:
            rc = p.wait(timeout=TRAIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        log.close()
        assert rc == 0, f"training {backend} at N={n} failed ({rc}):\n" + (root / f"{backend}-n{n}.log").read_text()[-3000:]
    return root


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: os.path.basename(p).replace(".ipynb", ""))
@pytest.mark.timeout(900)  # the first one also waits for the trainings
def test_notebook_runs_and_writes_figures(notebook, run_root, tmp_path):
    name = os.path.basename(notebook).replace(".ipynb", "")
    fig_dir = tmp_path / "figures"
    params = {"RUN_DIRS": [str(run_root / "*")], "BENCH_JSON": str(run_root / "bench.json"), "FIG_DIR": str(fig_dir)}
    execute_notebook(notebook, params, out_path=str(tmp_path / f"{name}.ipynb"), timeout=180)
    written = sorted(fig_dir.glob("*.png"))
    assert written, f"{name} wrote no figure into {fig_dir}"
    for png in written:
        assert png.stat().st_size > 1000, f"{png} is empty or nearly so"
    expected = list(EXPECTED_FIGURES.get(name, []))
    if name == "02_ring_vs_ps" and any(b.startswith("ps-sync") for b, _ in _training_specs()):
        expected.append("ps_over_ring.png")  # measured PS/ring ratio, drawn only when PS runs exist
    for pattern in expected:
        assert list(fig_dir.glob(pattern)), f"{name} did not write {pattern} (wrote {[p.name for p in written]})"


def test_every_notebook_has_expected_figures_listed():
    assert {os.path.basename(p)[:-6] for p in NOTEBOOKS} == set(EXPECTED_FIGURES)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: os.path.basename(p).replace(".ipynb", ""))
def test_notebook_is_stored_clean_with_a_parameters_cell(notebook):
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged `parameters`"
    assert "FIG_DIR" in code[0].source
    for c in code:
        assert not c.outputs and c.execution_count is None, "notebooks are stored without outputs"


def test_parameters_are_injected_after_the_parameters_cell():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("title"),
        nbformat.v4.new_code_cell("A = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(A)"),
    ])
    once = inject_parameters(nb, {"A": [1, "x"]})
    twice = inject_parameters(once, {"A": 2})
    assert [c.source for c in twice.cells][1:3] == ["A = 1", "# Parameters injected by ringtrain.notebooks\nA = 2"]
    assert len(twice.cells) == 4
    with pytest.raises(ValueError):
        inject_parameters(nb, {"not a name": 1})


@pytest.mark.timeout(120)
def test_failing_cell_is_reported_and_cli_exits_nonzero(tmp_path, capsys):
    path = tmp_path / "broken.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("DIVISOR = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(1 / DIVISOR)"),
    ]), str(path))
    with pytest.raises(NotebookError, match="ZeroDivisionError"):
        execute_notebook(str(path), {"DIVISOR": 0}, out_path=str(tmp_path / "out.ipynb"), timeout=60)
    assert (tmp_path / "out.ipynb").exists()  # the partial notebook is kept for reading
    assert notebooks_main([str(path), "-p", "DIVISOR", "0"]) == 1
    assert "ZeroDivisionError" in capsys.readouterr().err


# ---- The analysis functions the notebooks rely on, checked against the real runs -------------


def test_timeline_lays_phases_end_to_end(run_root):
    run = analysis.load_run(str(run_root / "ring-n2"), skip=2)
    tl = analysis.timeline(run)
    assert sorted(tl["rank"].unique()) == [0, 1] and tl["step"].nunique() == 3
    assert tl["start"].min() == 0.0
    for _, g in tl[tl.phase != "t_comm"].groupby(["rank", "step"]):
        assert (g["start"].iloc[1:].to_numpy() == g["end"].iloc[:-1].to_numpy()).all()
        assert list(g["phase"]) == list(analysis.PHASES)


def test_arrival_skew_is_zero_for_the_first_rank_each_step(run_root):
    run = analysis.load_run(str(run_root / "ring-n3"), skip=2)
    skew = analysis.arrival_skew(run)
    assert (skew.groupby("step")["skew"].min() == 0).all()
    assert (skew.groupby("step")["last"].sum() >= 1).all()
    table = analysis.straggler_table(run)
    assert list(table.index) == [0, 1, 2]
    assert table["last_share"].sum() >= 0.99


def test_ring_bytes_match_the_cost_model(run_root):
    runs = analysis.load_runs([str(run_root / "ring-n*"), str(run_root / "mpi-n*")])
    tab = analysis.bytes_table(runs)
    ring = tab[tab.backend == "ring"]
    assert len(ring) == 2
    assert ((ring.sent_ratio - 1).abs() < 0.01).all(), tab
    assert ((ring.recv_ratio - 1).abs() < 0.01).all(), tab


def test_alpha_beta_fit_recovers_a_known_model(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_fake_bench_rows()))
    fit = analysis.alpha_beta_fit(analysis.load_bench(str(path))).set_index("backend")
    assert fit.loc["ring", "alpha_s"] == pytest.approx(40e-6, rel=1e-6)
    assert fit.loc["ring", "algbw_GBps"] == pytest.approx(2.0, rel=1e-6)
    assert fit.loc["mpi", "busbw_GBps"] == pytest.approx(4.0, rel=1e-6)  # N=2: busbw = algbw
    hop, link = analysis.link_from_fit(fit.reset_index().iloc[0])
    assert link > 0 and hop > 0


def test_load_bench_names_missing_columns(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"backend": "ring", "size_bytes": 4}]))
    with pytest.raises(analysis.BenchError, match="time_s"):
        analysis.load_bench(str(path))


def test_ps_costs_more_than_ring_in_the_model():
    for n in (2, 4, 8):
        ring = analysis.modeled_step_time("ring", n, 0.01, 1e6, 1e-5, 1e9)
        ps = analysis.modeled_step_time("ps-sync", n, 0.01, 1e6, 1e-5, 1e9)
        assert ps >= ring - 1e-12
    assert analysis.modeled_step_time("ring", 1, 0.01, 1e6, 1e-5, 1e9) == 0.01
