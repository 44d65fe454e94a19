"""Hostfiles: SLURM's compressed node lists, the three dialects, and errors that name the line."""
import os
import subprocess
import sys

import pytest

from ringtrain.hostfile import (
    HostfileError,
    expand_nodelist,
    expand_tasks_per_node,
    format_hostfile,
    parse_hostfile,
    read_hostfile,
    slurm_hosts,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("text,hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("gpu-a[1],cpu.b[2-3]", ["gpu-a1", "cpu.b2", "cpu.b3"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node01]", "node[a-b]", "node[5-3]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(HostfileError, match="node list"):
        expand_nodelist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(HostfileError, match="N\\(xK\\)"):
        expand_tasks_per_node("2x3")


def test_slurm_hosts_from_env_without_scontrol():
    env = {"SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_TASKS_PER_NODE": "2(x3),1"}
    hosts = slurm_hosts(env, use_scontrol=False)
    assert hosts == [("node01", 2), ("node02", 2), ("node03", 2), ("node07", 1)]
    assert format_hostfile(hosts, "openmpi").splitlines()[0] == "node01 slots=2"
    assert format_hostfile(hosts, "mpich").splitlines()[-1] == "node07:1"
    assert format_hostfile(hosts, "horovod-H").strip() == "node01:2,node02:2,node03:2,node07:1"


def test_slurm_hosts_mismatch_and_missing():
    with pytest.raises(HostfileError, match="4 nodes but .* 2 counts"):
        slurm_hosts({"SLURM_JOB_NODELIST": "n[1-4]", "SLURM_TASKS_PER_NODE": "2(x2)"}, use_scontrol=False)
    with pytest.raises(HostfileError, match="inside an allocation"):
        slurm_hosts({}, use_scontrol=False)


@pytest.mark.parametrize("fmt", ["openmpi", "mpich", "horovod", "horovod-H"])
def test_round_trip(fmt):
    hosts = [("node01", 2), ("gpu5", 4)]
    assert parse_hostfile(format_hostfile(hosts, fmt), fmt) == hosts


@pytest.mark.parametrize("fmt,text,where,why", [
    ("openmpi", "a slots=2\n\nb:3\n", ":3:", "MPICH/horovod syntax"),
    ("openmpi", "# c\na slots=x\n", ":2:", "unknown field"),
    ("openmpi", "a slots=1\na slots=2\n", ":2:", "listed already on line 1"),
    ("mpich", "a:2\nb slots=2\n", ":2:", "Open MPI syntax"),
    ("horovod", "a:2\nb:-1\n", ":2:", "host or host:N"),
    ("mpich", "a:0\n", ":1:", "at least 1"),
])
def test_bad_lines_name_the_line(fmt, text, where, why):
    with pytest.raises(HostfileError) as e:
        parse_hostfile(text, fmt, source="hosts")
    assert f"hosts{where}" in str(e.value) and why in str(e.value)


@pytest.mark.parametrize("fmt", ["openmpi", "mpich", "horovod"])
def test_shipped_examples_are_valid(fmt):
    hosts = read_hostfile(os.path.join(ROOT, "hostfiles", f"{fmt}.hosts"), fmt)
    assert hosts == [("node01", 4), ("node02", 4)]


def test_cli_from_slurm(tmp_path):
    env = dict(os.environ, SLURM_JOB_NODELIST="c[1-2]", SLURM_TASKS_PER_NODE="3(x2)", PYTHONPATH=ROOT)
    env.pop("SLURM_CONF", None)
    out = tmp_path / "hosts"
    p = subprocess.run([sys.executable, "-m", "ringtrain", "hostfile", "--from-slurm", "--format", "mpich",
                        "-o", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert out.read_text() == "c1:3\nc2:3\n"
    bad = tmp_path / "bad"
    bad.write_text("c1 slots=2\nc2:2\n")
    p = subprocess.run([sys.executable, "-m", "ringtrain", "hostfile", "--check", str(bad)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and f"{bad}:2:" in p.stderr
