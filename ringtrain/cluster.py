"""An emulated cluster on one machine: hosts in network namespaces behind rate-limited links.

Lets the communication schemes be compared where bandwidth matters (a 1 Gbit/s Ethernet
cluster, say) without a cluster. Needs root and `ip` (iproute2), `tc`, `nsenter`, `unshare`.

    ringtrain cluster up --hosts 4 --slots 1 --bandwidth 1gbit --latency 100us
    /tmp/ringtrain-cluster/mpirun -n 4 python -m ringtrain bench allreduce --backends ring,mpi
    ringtrain cluster status
    ringtrain cluster down

What `up` builds (every name starts with the prefix, default `rtc`, so `down` can find all
of it again, also after a crash):

    netns rtc-switch   a bridge br0 with one port per host, plus one for the head
    netns rtc-nodeK    host K: eth0 = 10.77.0.(K+1)/24, hostname nodeK (a UTS namespace of its
                       own, kept in DIR/uts/nodeK), tbf at --bandwidth on its egress
    port K on switch   tbf at --bandwidth towards host K, so what a host receives is limited too
                       (N workers pushing to one parameter server share its one downlink)
    netns rtc-head     the "login node" (last address of the subnet), where mpirun runs; its link
                       is not limited and carries only Open MPI's control traffic

Open MPI starts its daemons on the hosts through DIR/agent.sh (instead of ssh), which enters
the host's network and UTS namespaces. DIR/mpirun wraps `ip netns exec rtc-head mpirun` with
the hostfile and the options that keep all traffic on the cluster's subnet (TCP only:
`--mca btl tcp,self`, so ranks on different hosts really cross the links).

Latency (`--latency`) needs the kernel's netem qdisc; where it is missing, `up` says so, records
`latency_applied: false` in the state file and carries on with bandwidth limits only.
Nothing leaves the namespaces: the subnet exists only inside them, and the root namespace gets
no address or route.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

DEFAULT_DIR = os.environ.get("RINGTRAIN_CLUSTER_DIR", "/tmp/ringtrain-cluster")
DEFAULT_PREFIX = "rtc"
DEFAULT_SUBNET = "10.77.0.0/24"


class ClusterError(RuntimeError):
    pass


# --------------------------------------------------------------------------- parsing

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_rate(text: str) -> int:
    """'1gbit' -> 1_000_000_000 bits/s. Units as tc spells them (bit, kbit, mbit, gbit, and
    bps/kbps/mbps/gbps for bytes per second); a bare number is bits per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _RATE_UNITS and m.group(2) != "":
        raise ClusterError(f"bandwidth {text!r}: expected a number with a unit such as 100mbit or 1gbit")
    bits = float(m.group(1)) * _RATE_UNITS.get(m.group(2), 1)
    if bits < 8000:
        raise ClusterError(f"bandwidth {text!r} is below 8 kbit/s; is the unit missing?")
    return int(bits)


def parse_latency(text: str) -> float:
    """'100us' -> 1e-4 seconds. Units s, ms, us; a bare number is seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms|us|usec|msec|)\s*", text.lower())
    if not m:
        raise ClusterError(f"latency {text!r}: expected a number with a unit such as 100us or 1ms")
    scale = {"": 1, "s": 1, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}[m.group(2)]
    return float(m.group(1)) * scale


def format_rate(bits: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"


# --------------------------------------------------------------------------- the plan


@dataclass
class Host:
    name: str  # hostname inside its UTS namespace, and the name in the hostfile
    netns: str
    address: str
    port: str  # its port on the switch


@dataclass
class ClusterSpec:
    prefix: str
    dir: str
    subnet: str
    hosts: list = field(default_factory=list)  # list[Host]
    slots: int = 1
    bandwidth_bits: int = 0
    latency_s: float = 0.0
    latency_applied: bool = False
    switch_netns: str = ""
    head_netns: str = ""
    head_address: str = ""
    created: float = 0.0

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ClusterSpec":
        d = json.loads(text)
        d["hosts"] = [Host(**h) for h in d.get("hosts", [])]
        return cls(**d)

    @property
    def hostfile(self) -> str:
        return os.path.join(self.dir, "hostfile")

    @property
    def agent(self) -> str:
        return os.path.join(self.dir, "agent.sh")

    @property
    def mpirun(self) -> str:
        return os.path.join(self.dir, "mpirun")

    def uts_file(self, host: Host) -> str:
        return os.path.join(self.dir, "uts", host.name)

    def mpirun_options(self) -> list:
        """Options that make Open MPI launch through the agent and keep to the cluster subnet."""
        return [
            "--hostfile", self.hostfile,
            "--prtemca", "plm_ssh_agent", self.agent,
            # Every daemon is started from the head; none has to launch the next one.
            "--prtemca", "plm_ssh_no_tree_spawn", "1",
            "--prtemca", "oob_tcp_if_include", self.subnet,
            "--mca", "pml", "ob1",
            "--mca", "btl", "tcp,self",
            "--mca", "btl_tcp_if_include", self.subnet,
            # Messages up to 16 MiB go eagerly, without the rendezvous handshake. With it, the
            # receiver's reply waits in the one TCP socket behind the megabytes it is sending
            # itself, and a two-way exchange (Sendrecv, a 2-rank ring) ran at half the link rate
            # each way here (52 of 100 Mbit/s; 94 with these settings, and 95 for one-way Send).
            "--mca", "btl_tcp_eager_limit", str(16 << 20),
            "--mca", "btl_tcp_max_send_size", str(16 << 20),
        ]

    def mpirun_command(self, nranks: int | None = None) -> list:
        """The full command that the DIR/mpirun wrapper runs (without the program)."""
        n = nranks if nranks is not None else len(self.hosts) * self.slots
        return ["ip", "netns", "exec", self.head_netns, "mpirun", "-n", str(n), *self.mpirun_options()]


def plan(hosts: int, slots: int, bandwidth: str, latency: str, subnet: str,
         prefix: str = DEFAULT_PREFIX, directory: str = DEFAULT_DIR) -> ClusterSpec:
    """Names and addresses of everything `up` will create. Pure: touches nothing."""
    if hosts < 1:
        raise ClusterError(f"--hosts {hosts}: need at least one host")
    if slots < 1:
        raise ClusterError(f"--slots {slots}: need at least one slot per host")
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
        raise ClusterError(f"--prefix {prefix!r}: 1-8 lowercase letters/digits, starting with a letter "
                           "(interface names are limited to 15 characters)")
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as e:
        raise ClusterError(f"--subnet {subnet!r}: {e}") from None
    if net.version != 4:
        raise ClusterError(f"--subnet {subnet}: only IPv4 subnets are supported")
    if not net.is_private:
        raise ClusterError(f"--subnet {subnet} is not a private range; pick one inside 10.0.0.0/8, "
                           "172.16.0.0/12 or 192.168.0.0/16 so no traffic could leave for the outside")
    usable = list(net.hosts())
    if len(usable) < hosts + 1:
        raise ClusterError(f"--subnet {subnet} has {len(usable)} usable addresses; {hosts} hosts and the head need {hosts + 1}")
    spec = ClusterSpec(
        prefix=prefix,
        dir=os.path.abspath(directory),
        subnet=str(net),
        slots=slots,
        bandwidth_bits=parse_rate(bandwidth),
        latency_s=parse_latency(latency),
        switch_netns=f"{prefix}-switch",
        head_netns=f"{prefix}-head",
        head_address=str(usable[-1]),
    )
    spec.hosts = [Host(name=f"node{k}", netns=f"{prefix}-node{k}", address=str(usable[k]), port=f"port{k}")
                  for k in range(hosts)]
    return spec


# --------------------------------------------------------------------------- generated files


def hostfile_text(spec: ClusterSpec) -> str:
    lines = [f"# Open MPI hostfile for the emulated cluster {spec.prefix} ({spec.subnet})"]
    lines += [f"{h.name} slots={spec.slots}" for h in spec.hosts]
    return "\n".join(lines) + "\n"


def agent_text(spec: ClusterSpec) -> str:
    """The launcher agent Open MPI calls instead of `ssh HOST COMMAND`."""
    cases = "\n".join(
        f"    {h.name}|{h.address}) ns={h.netns}; uts={shlex.quote(spec.uts_file(h))} ;;" for h in spec.hosts
    )
    return f"""#!/bin/sh
# Launcher agent for the emulated cluster {spec.prefix}, written by `ringtrain cluster up`.
# Open MPI runs it as it would run ssh: agent.sh [ssh options] HOST COMMAND...
# It runs COMMAND in HOST's network and UTS namespaces instead of logging in anywhere.
while [ $# -gt 0 ]; do
    case "$1" in
        -o|-p|-l|-i|-F) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
host=$1
shift
case "$host" in
{cases}
    *) echo "agent.sh: $host is not a host of the emulated cluster {spec.prefix}" >&2; exit 255 ;;
esac
exec nsenter --net=/run/netns/$ns --uts="$uts" sh -c "$*"
"""


def wrapper_text(spec: ClusterSpec) -> str:
    opts = " ".join(shlex.quote(o) for o in spec.mpirun_options())
    return f"""#!/bin/sh
# mpirun on the emulated cluster {spec.prefix}, written by `ringtrain cluster up`.
#   {spec.mpirun} -n {len(spec.hosts) * spec.slots} python -m ringtrain bench allreduce
# Runs mpirun in the head namespace with the cluster's hostfile and launcher agent.
# Extra mpirun options go before the program, as usual.
exec ip netns exec {spec.head_netns} mpirun {opts} "$@"
"""


# --------------------------------------------------------------------------- system calls


def _run(cmd: list, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=capture, text=True)
    if check and p.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({p.returncode}): {(p.stderr or '').strip()}")
    return p


def _ip(*args, check=True):
    return _run(["ip", *args], check=check)


def list_netns(prefix: str) -> list:
    out = _ip("netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def _root_links(prefix: str) -> list:
    out = _ip("-o", "link", "show", check=False).stdout
    names = [m.group(1).split("@")[0] for m in re.finditer(r"^\d+:\s+(\S+):", out, re.M)]
    return [n for n in names if n.startswith(prefix + "-")]


def check_can_emulate() -> None:
    """Raise ClusterError saying why this machine cannot host an emulated cluster."""
    if os.geteuid() != 0:
        raise ClusterError("needs root (it creates network namespaces, veth pairs and tc qdiscs)")
    for tool in ("ip", "tc", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            raise ClusterError(f"`{tool}` not found; install iproute2 (ip, tc) and util-linux (nsenter, unshare)")


def _tc_link(netns: str, dev: str, spec: ClusterSpec) -> bool:
    """tbf at the configured rate on dev's egress, and netem delay under it if asked for.
    Returns whether the delay could be applied."""
    rate = spec.bandwidth_bits
    # The bucket must hold a few full-size (GSO) packets and about a millisecond of traffic,
    # or tbf drops and TCP never reaches the rate.
    burst = max(64 * 1024, int(rate / 8 * 1e-3))
    _run(["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", "handle", "1:",
          "tbf", "rate", f"{rate}bit", "burst", str(burst), "latency", "50ms"])
    if spec.latency_s <= 0:
        return True
    p = _run(["tc", "-n", netns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
              "netem", "delay", f"{spec.latency_s * 1e6:.0f}us"], check=False)
    return p.returncode == 0


def up(spec: ClusterSpec, log=print) -> ClusterSpec:
    """Create the cluster described by `spec` and write its state, hostfile, agent and wrapper.
    On any failure everything already made is removed again."""
    check_can_emulate()
    state_path = os.path.join(spec.dir, "state.json")
    existing = list_netns(spec.prefix)
    if existing or os.path.exists(state_path):
        raise ClusterError(
            f"an emulated cluster with prefix {spec.prefix!r} exists already ({', '.join(existing) or state_path}); "
            f"run `ringtrain cluster down --prefix {spec.prefix} --dir {spec.dir}` first")
    os.makedirs(os.path.join(spec.dir, "uts"), exist_ok=True)
    spec.created = time.time()
    # The state goes to disk before anything is made, so that `down` can clean up after a crash.
    with open(state_path, "w") as f:
        f.write(spec.to_json())
    try:
        _build(spec, log)
    except BaseException:
        down(spec.prefix, spec.dir, log=lambda *a: None)
        raise
    with open(state_path, "w") as f:
        f.write(spec.to_json())
    return spec


def _build(spec: ClusterSpec, log) -> None:
    sw, head = spec.switch_netns, spec.head_netns
    plen = spec.prefixlen
    for ns in (sw, head):
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", sw, "link", "add", "br0", "type", "bridge")
    _ip("-n", sw, "link", "set", "br0", "up")

    def attach(ns: str, port: str, dev: str):
        # Make the pair inside the switch, then move one end to the host and rename it.
        tmp = f"{spec.prefix}-tmp"
        _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", tmp)
        _ip("-n", sw, "link", "set", tmp, "netns", ns)
        _ip("-n", ns, "link", "set", tmp, "name", dev)
        _ip("-n", sw, "link", "set", port, "master", "br0", "up")

    attach(head, "head", "eth0")
    _ip("-n", head, "addr", "add", f"{spec.head_address}/{plen}", "dev", "eth0")
    _ip("-n", head, "link", "set", "eth0", "up")

    applied = True
    for h in spec.hosts:
        _ip("netns", "add", h.netns)
        _ip("-n", h.netns, "link", "set", "lo", "up")
        attach(h.netns, h.port, "eth0")
        _ip("-n", h.netns, "addr", "add", f"{h.address}/{plen}", "dev", "eth0")
        _ip("-n", h.netns, "link", "set", "eth0", "up")
        applied &= _tc_link(h.netns, "eth0", spec)  # host -> switch
        applied &= _tc_link(sw, h.port, spec)  # switch -> host
        uts = spec.uts_file(h)
        open(uts, "w").close()
        _run(["unshare", f"--uts={uts}", "hostname", h.name])
    spec.latency_applied = applied or spec.latency_s <= 0
    if not spec.latency_applied:
        log(f"warning: this kernel has no netem qdisc; links get {format_rate(spec.bandwidth_bits)} "
            f"but no added latency ({spec.latency_s * 1e6:g} us asked for)")

    for path, text, mode in ((spec.hostfile, hostfile_text(spec), 0o644),
                             (spec.agent, agent_text(spec), 0o755),
                             (spec.mpirun, wrapper_text(spec), 0o755)):
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)


def down(prefix: str = DEFAULT_PREFIX, directory: str = DEFAULT_DIR, log=print) -> list:
    """Remove every namespace, link, mount and file of the cluster with this prefix.
    Works from the state file and, where that is missing or stale, from the names alone.
    Processes still running inside the cluster's namespaces are stopped. Idempotent."""
    check_can_emulate()
    removed = []
    namespaces = list_netns(prefix)
    state_path = os.path.join(directory, "state.json")
    if os.path.exists(state_path):
        try:
            spec = ClusterSpec.from_json(open(state_path).read())
            namespaces += [n for n in [spec.switch_netns, spec.head_netns] + [h.netns for h in spec.hosts]
                           if n in list_netns(prefix) and n not in namespaces]
        except (ValueError, TypeError, KeyError):
            log(f"warning: unreadable {state_path}; cleaning up by name prefix {prefix!r} only")

    # Processes first (ranks, daemons that outlived a crashed mpirun), then the namespaces.
    pids = set()
    for ns in namespaces:
        out = _ip("netns", "pids", ns, check=False).stdout
        pids |= {int(p) for p in out.split() if p.isdigit()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if _alive(p)]
        for p in alive:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        for _ in range(20):
            if not any(_alive(p) for p in alive):
                break
            time.sleep(0.1)
    if pids:
        removed.append(f"{len(pids)} processes")

    uts_dir = os.path.join(directory, "uts")
    if os.path.isdir(uts_dir):
        for name in sorted(os.listdir(uts_dir)):
            path = os.path.join(uts_dir, name)
            _run(["umount", path], check=False)
            os.unlink(path)
            removed.append(f"uts {name}")
        os.rmdir(uts_dir)

    for ns in namespaces:
        _ip("netns", "del", ns, check=False)
        removed.append(f"netns {ns}")
    for link in _root_links(prefix):  # a half-made pair from an interrupted `up`
        _ip("link", "del", link, check=False)
        removed.append(f"link {link}")
    for name in ("state.json", "hostfile", "agent.sh", "mpirun"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.unlink(path)
    if os.path.isdir(directory) and not os.listdir(directory):
        os.rmdir(directory)
    for what in removed:
        log(f"removed {what}")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def load(directory: str = DEFAULT_DIR) -> ClusterSpec | None:
    path = os.path.join(directory, "state.json")
    if not os.path.exists(path):
        return None
    return ClusterSpec.from_json(open(path).read())


def status(prefix: str = DEFAULT_PREFIX, directory: str = DEFAULT_DIR) -> tuple:
    """(spec or None, rows): one row per host with what the kernel says now."""
    spec = load(directory)
    present = set(list_netns(prefix))
    rows = []
    if spec is None:
        return None, [{"netns": ns, "state": "orphan (no state file)"} for ns in sorted(present)]
    for h in spec.hosts:
        row = {"host": h.name, "netns": h.netns, "address": h.address, "state": "missing"}
        if h.netns in present:
            name = _run(["nsenter", f"--uts={spec.uts_file(h)}", "hostname"], check=False).stdout.strip()
            row.update(state="up", hostname=name or "?",
                       tx_bytes=_qdisc_bytes(h.netns, "eth0"),
                       rx_bytes=_qdisc_bytes(spec.switch_netns, h.port))
        rows.append(row)
    return spec, rows


def _qdisc_bytes(netns: str, dev: str) -> int | None:
    out = _run(["tc", "-s", "-n", netns, "qdisc", "show", "dev", dev], check=False).stdout
    m = re.search(r"qdisc tbf .*?Sent (\d+) bytes", out, re.S)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- command line


def usage_text(spec: ClusterSpec) -> str:
    n = len(spec.hosts) * spec.slots
    full = " ".join(shlex.quote(c) for c in spec.mpirun_command(n))
    lat = f"{spec.latency_s * 1e6:g} us" + ("" if spec.latency_applied else " (not applied: no netem)")
    return (
        f"emulated cluster {spec.prefix}: {len(spec.hosts)} hosts x {spec.slots} slots on {spec.subnet}, "
        f"links {format_rate(spec.bandwidth_bits)} each way, latency {lat}\n"
        f"hostfile: {spec.hostfile}\n"
        f"run {n} ranks with the wrapper:\n"
        f"    {spec.mpirun} -n {n} python -m ringtrain bench allreduce --backends ring,mpi\n"
        f"which runs:\n"
        f"    {full} python -m ringtrain ...\n"
        f"(as root with Open MPI also set OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)\n"
        f"remove it with: ringtrain cluster down" + (f" --prefix {spec.prefix}" if spec.prefix != DEFAULT_PREFIX else "")
        + (f" --dir {spec.dir}" if spec.dir != os.path.abspath(DEFAULT_DIR) else "")
    )


def add_cluster_parser(subparsers) -> argparse.ArgumentParser:
    """Add `cluster up|down|status` to the ringtrain command line."""
    p = subparsers.add_parser(
        "cluster", help="emulate a cluster on this machine (network namespaces, rate-limited links; root)",
        description=__doc__.split("What `up` builds")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(title="actions", metavar="ACTION")

    def common(q):
        q.add_argument("--prefix", default=DEFAULT_PREFIX,
                       help="name prefix of every namespace and link (default %(default)s)")
        q.add_argument("--dir", default=DEFAULT_DIR,
                       help="where the state file, hostfile, agent and mpirun wrapper go (default %(default)s)")

    q = csub.add_parser("up", help="create hosts, links, hostfile and launcher agent")
    q.add_argument("--hosts", type=int, default=4, help="number of emulated hosts (default %(default)s)")
    q.add_argument("--slots", type=int, default=1, help="MPI slots per host (default %(default)s)")
    q.add_argument("--bandwidth", default="1gbit", help="rate of each link, each way, as tc writes it (default %(default)s)")
    q.add_argument("--latency", default="0", help="one-way delay added at each host's egress, e.g. 100us (needs netem)")
    q.add_argument("--subnet", default=DEFAULT_SUBNET,
                   help="private IPv4 subnet that exists only inside the namespaces (default %(default)s)")
    common(q)
    q.set_defaults(func=_cmd_up)

    q = csub.add_parser("down", help="remove everything `up` made (also after a crash)")
    common(q)
    q.set_defaults(func=_cmd_down)

    q = csub.add_parser("status", help="list hosts, addresses, hostnames and bytes through each link")
    common(q)
    q.set_defaults(func=_cmd_status)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


def _cmd_up(args) -> int:
    try:
        spec = plan(args.hosts, args.slots, args.bandwidth, args.latency, args.subnet, args.prefix, args.dir)
        up(spec)
    except ClusterError as e:
        print(f"ringtrain cluster up: {e}", file=sys.stderr)
        return 1
    print(usage_text(spec))
    return 0


def _cmd_down(args) -> int:
    try:
        removed = down(args.prefix, args.dir)
    except ClusterError as e:
        print(f"ringtrain cluster down: {e}", file=sys.stderr)
        return 1
    if not removed:
        print(f"nothing to remove (no emulated cluster with prefix {args.prefix!r})")
    return 0


def _cmd_status(args) -> int:
    spec, rows = status(args.prefix, args.dir)
    if spec is None:
        if rows:
            print(f"no state file in {args.dir}, but namespaces with prefix {args.prefix!r} exist "
                  f"({', '.join(r['netns'] for r in rows)}); `ringtrain cluster down` removes them")
        else:
            print(f"no emulated cluster with prefix {args.prefix!r} (state dir {args.dir})")
        return 1
    print(usage_text(spec).split("\n")[0])
    print(f"{'host':8} {'netns':14} {'address':15} {'hostname':9} {'state':8} {'tx bytes':>12} {'rx bytes':>12}")
    for r in rows:
        print(f"{r['host']:8} {r['netns']:14} {r['address']:15} {r.get('hostname', '-'):9} {r['state']:8} "
              f"{r.get('tx_bytes') if r.get('tx_bytes') is not None else '-':>12} "
              f"{r.get('rx_bytes') if r.get('rx_bytes') is not None else '-':>12}")
    print(f"switch: {spec.switch_netns} (bridge br0), head: {spec.head_netns} {spec.head_address}, "
          f"mpirun wrapper: {spec.mpirun}")
    return 0 if all(r["state"] == "up" for r in rows) else 1
