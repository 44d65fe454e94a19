"""The emulated cluster: hosts in network namespaces, rate-limited links, mpirun across them.

The tests that build namespaces need root and a kernel that allows `ip netns add`; they skip
with the reason otherwise. They use their own prefix and subnet, so a cluster that a user
has up is left alone.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from ringtrain import cluster
from ringtrain.cluster import ClusterError, parse_latency, parse_rate, plan
from ringtrain.ring import DEFAULT_CHUNK_BYTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "rttest"
SUBNET = "10.78.0.0/24"
RATE = "200mbit"  # low enough that two cores keep up, so the link and not the CPU is the limit


def test_parse_rate_and_latency():
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("200mbit") == 2 * 10**8
    assert parse_rate("125mbps") == 10**9
    assert parse_latency("100us") == pytest.approx(1e-4)
    assert parse_latency("2ms") == pytest.approx(2e-3)
    assert parse_latency("0") == 0
    for bad in ("fast", "1 gigabit", "100"):
        with pytest.raises(ClusterError):
            parse_rate(bad)
    with pytest.raises(ClusterError):
        parse_latency("soon")


def test_plan_names_and_addresses(tmp_path):
    spec = plan(3, 2, "1gbit", "100us", "10.77.0.0/24", prefix="rtc", directory=str(tmp_path))
    assert [h.name for h in spec.hosts] == ["node0", "node1", "node2"]
    assert [h.netns for h in spec.hosts] == ["rtc-node0", "rtc-node1", "rtc-node2"]
    assert [h.address for h in spec.hosts] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert spec.head_address == "10.77.0.254"
    assert cluster.hostfile_text(spec).splitlines()[1:] == ["node0 slots=2", "node1 slots=2", "node2 slots=2"]
    agent = cluster.agent_text(spec)
    assert "node1|10.77.0.2) ns=rtc-node1" in agent and "nsenter --net=/run/netns/$ns" in agent
    cmd = spec.mpirun_command()
    assert cmd[:6] == ["ip", "netns", "exec", "rtc-head", "mpirun", "-n"] and cmd[6] == "6"
    opts = " ".join(cmd)
    for need in ("--prtemca plm_ssh_agent", "--prtemca oob_tcp_if_include 10.77.0.0/24",
                 "--mca btl tcp,self", "--mca btl_tcp_if_include 10.77.0.0/24"):
        assert need in opts
    assert json.loads(spec.to_json())["hosts"][2]["address"] == "10.77.0.3"


@pytest.mark.parametrize("args,why", [
    ((0, 1, "1gbit", "0", "10.77.0.0/24"), "at least one host"),
    ((2, 1, "1gbit", "0", "8.8.8.0/24"), "not a private range"),
    ((8, 1, "1gbit", "0", "10.77.0.0/29"), "usable addresses"),
    ((2, 1, "1gbit", "0", "10.77.0.1/24"), "--subnet"),
])
def test_plan_rejects(args, why):
    with pytest.raises(ClusterError, match=why):
        plan(*args)


# --------------------------------------------------------------------------- real namespaces


def _skip_reason():
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    try:
        cluster.check_can_emulate()
    except ClusterError as e:
        return str(e)
    probe = f"{PREFIX}-probe"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"`ip netns add` fails here: {p.stderr.strip()}"
    try:
        q = subprocess.run(["ip", "-n", probe, "link", "add", "vprobe", "type", "veth", "peer", "name", "vprobe1"],
                           capture_output=True, text=True)
        if q.returncode != 0:
            return f"cannot create veth pairs: {q.stderr.strip()}"
        q = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "vprobe", "root", "tbf", "rate", "1gbit",
                            "burst", "64kb", "latency", "50ms"], capture_output=True, text=True)
        if q.returncode != 0:
            return f"the kernel has no tbf qdisc: {q.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


needs_netns = pytest.mark.skipif(bool(_skip_reason()), reason=str(_skip_reason()))


def _cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "ringtrain", "cluster", *args], env=env,
                       capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def _leftovers():
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line for line in (ns + links).splitlines() if f"{PREFIX}-" in line]


PROBE = textwrap.dedent("""
    import socket, time
    import numpy as np
    from mpi4py import MPI
    from ringtrain.ring import Ring
    c = MPI.COMM_WORLD
    names = c.allgather(socket.gethostname())
    ring = Ring(c)  # its default chunk is chosen by locality
    chunk = ring.chunk_bytes
    ring.close()
    n = 8 << 20
    a, b = np.ones(n, np.uint8), np.empty(n, np.uint8)
    best = float("inf")
    for _ in range(3):
        c.Barrier()
        t = time.perf_counter()
        if c.rank < 2:
            c.Sendrecv(a, dest=1 - c.rank, recvbuf=b, source=1 - c.rank)
        best = min(best, time.perf_counter() - t)
    if c.rank == 0:
        print("HOSTS", " ".join(names))
        print("MBITS", n * 8 / best / 1e6)
        print("CHUNK", chunk)
""")


@needs_netns
def test_mpirun_across_rate_limited_hosts(tmp_path):
    d = str(tmp_path / "cluster")
    try:
        out = _cli("up", "--hosts", "3", "--slots", "1", "--bandwidth", RATE, "--latency", "100us",
                   "--subnet", SUBNET, "--prefix", PREFIX, "--dir", d).stdout
        wrapper = os.path.join(d, "mpirun")
        assert f"{wrapper} -n 3" in out and "ip netns exec rttest-head mpirun" in out
        script = tmp_path / "probe.py"
        script.write_text(PROBE)
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        p = subprocess.run([wrapper, "-n", "3", sys.executable, str(script)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        hosts = re.search(r"HOSTS (.*)", p.stdout).group(1).split()
        assert hosts == ["node0", "node1", "node2"], "each rank should run on its own emulated host"
        mbits = float(re.search(r"MBITS (\S+)", p.stdout).group(1))
        # Each way at once over a full-duplex link: near the configured rate, never above it.
        assert 0.7 * 200 < mbits < 1.02 * 200, f"{mbits:.1f} Mbit/s each way on a {RATE} link"
        # Across hosts the ring pipelines its segments (on one node it sends them whole).
        assert int(re.search(r"CHUNK (\d+)", p.stdout).group(1)) == DEFAULT_CHUNK_BYTES

        st = _cli("status", "--prefix", PREFIX, "--dir", d).stdout
        rows = {line.split()[0]: line.split() for line in st.splitlines() if line.startswith("node")}
        assert set(rows) == {"node0", "node1", "node2"}
        assert rows["node1"][3] == "node1" and rows["node1"][4] == "up"
        assert int(rows["node0"][5]) > 3 * (8 << 20), "rank 0's traffic should have crossed node0's link"
        assert int(rows["node2"][5]) < (8 << 20), "node2 took no part in the exchange"

        again = _cli("up", "--hosts", "3", "--prefix", PREFIX, "--dir", d, "--subnet", SUBNET, check=False)
        assert again.returncode == 1 and "exists already" in again.stderr
    finally:
        _cli("down", "--prefix", PREFIX, "--dir", d, check=False)
    assert _leftovers() == []
    assert not os.path.exists(d)


@needs_netns
def test_down_after_a_crash(tmp_path):
    """State file lost and a process left running on a host: `down` still removes it all."""
    d = str(tmp_path / "cluster")
    try:
        _cli("up", "--hosts", "2", "--bandwidth", RATE, "--subnet", SUBNET, "--prefix", PREFIX, "--dir", d)
        orphan = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-node1", "sleep", "300"])
        os.unlink(os.path.join(d, "state.json"))
        st = _cli("status", "--prefix", PREFIX, "--dir", d, check=False)
        assert st.returncode == 1 and "no state file" in st.stdout
        out = _cli("down", "--prefix", PREFIX, "--dir", d).stdout
        assert f"removed netns {PREFIX}-node1" in out and "processes" in out
        orphan.wait(timeout=10)
    finally:
        _cli("down", "--prefix", PREFIX, "--dir", d, check=False)
    assert _leftovers() == []
    assert "nothing to remove" in _cli("down", "--prefix", PREFIX, "--dir", d).stdout
