"""Hostfiles: write one from a SLURM allocation, read and validate one, in three dialects.

    ringtrain hostfile --from-slurm --format openmpi > hosts    # inside sbatch/salloc
    mpirun --hostfile hosts -n $SLURM_NTASKS python -m ringtrain train ...
    ringtrain hostfile --check hosts --format openmpi            # names the bad line, if any

Dialects (examples in hostfiles/):
    openmpi   `node01 slots=2`   mpirun --hostfile FILE          (also `node01` alone: 1 slot)
    mpich     `node01:2`         mpiexec -f FILE (Hydra)         (also `node01` alone: 1 slot)
    horovod   `node01:2`         horovodrun -hostfile FILE; `-H node01:2,node02:2` is the same
              hosts joined by commas, which `--format horovod-H` prints

SLURM's compressed forms are parsed here, so no SLURM command is needed:
SLURM_JOB_NODELIST `node[01-03,07],gpu5` and SLURM_TASKS_PER_NODE `2(x3),1`. Where
`scontrol` exists, `scontrol show hostnames` is preferred for the node list.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

FORMATS = ("openmpi", "mpich", "horovod", "horovod-H")


class HostfileError(ValueError):
    pass


# --------------------------------------------------------------------------- SLURM syntax


def _split_top(text: str) -> list:
    """Split on commas that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostfileError(f"node list {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise HostfileError(f"node list {text!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_ranges(body: str, whole: str) -> list:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as SLURM does)."""
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise HostfileError(f"node list {whole!r}: bad range {item!r} inside brackets")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise HostfileError(f"node list {whole!r}: range {item!r} runs backwards")
        width = len(lo)
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(text: str) -> list:
    """Expand SLURM's compressed host list: 'node[01-03,07],gpu5' -> node01 node02 node03 node07 gpu5.
    Several bracket groups in one name multiply out ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2)."""
    hosts = []
    for part in _split_top(text):
        names = [""]
        for m in re.finditer(r"([^\[\]]+)|\[([^\]]*)\]", part):
            if m.group(1) is not None:
                names = [n + m.group(1) for n in names]
            else:
                names = [n + s for n in names for s in _expand_ranges(m.group(2), text)]
        hosts += names
    return hosts


def expand_tasks_per_node(text: str) -> list:
    """'2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise HostfileError(f"SLURM_TASKS_PER_NODE {text!r}: cannot read {item!r} (expected N or N(xK))")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _scontrol_hostnames(nodelist: str) -> list | None:
    if shutil.which("scontrol") is None:
        return None
    try:
        p = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = p.stdout.split()
    return names if p.returncode == 0 and names else None


def slurm_hosts(env=None, use_scontrol: bool = True) -> list:
    """[(host, slots)] of the current SLURM allocation, from SLURM_JOB_NODELIST and
    SLURM_TASKS_PER_NODE (or SLURM_NODELIST / SLURM_STEP_TASKS_PER_NODE where only those are set)."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise HostfileError("SLURM_JOB_NODELIST is not set: run this inside an allocation (sbatch, salloc, srun)")
    tpn = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE")
    hosts = (_scontrol_hostnames(nodelist) if use_scontrol else None) or expand_nodelist(nodelist)
    if tpn:
        counts = expand_tasks_per_node(tpn)
    else:
        counts = [int(env.get("SLURM_CPUS_ON_NODE", 1))] * len(hosts)
    if len(counts) != len(hosts):
        raise HostfileError(
            f"SLURM_JOB_NODELIST={nodelist!r} names {len(hosts)} nodes but SLURM_TASKS_PER_NODE={tpn!r} "
            f"gives {len(counts)} counts")
    return list(zip(hosts, counts))


# --------------------------------------------------------------------------- writing and reading


def format_hostfile(hosts: list, fmt: str) -> str:
    """Text of a hostfile for [(host, slots)] in dialect `fmt` (see FORMATS)."""
    if fmt == "openmpi":
        return "".join(f"{h} slots={n}\n" for h, n in hosts)
    if fmt in ("mpich", "horovod"):
        return "".join(f"{h}:{n}\n" for h, n in hosts)
    if fmt == "horovod-H":
        return ",".join(f"{h}:{n}" for h, n in hosts) + "\n"
    raise HostfileError(f"unknown hostfile format {fmt!r}; choose one of {', '.join(FORMATS)}")


_HOST = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?"


def parse_hostfile(text: str, fmt: str, source: str = "hostfile") -> list:
    """[(host, slots)] from a hostfile's text; HostfileError names the file and line of a bad line.
    Comments (#) and blank lines are skipped. Open MPI's max_slots= is accepted and ignored."""
    if fmt == "horovod-H":
        text = "\n".join(text.replace(",", "\n").splitlines())
        fmt = "horovod"
    hosts, seen = [], {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue

        def bad(why):
            return HostfileError(f"{source}:{lineno}: {why}: {raw.strip()!r}")

        if fmt == "openmpi":
            fields = line.split()
            host, slots = fields[0], 1
            if re.fullmatch(rf"{_HOST}:\d+", host):
                raise bad("this is MPICH/horovod syntax (host:N); Open MPI wants 'host slots=N'")
            if not re.fullmatch(_HOST, host):
                raise bad("not a host name")
            for f in fields[1:]:
                m = re.fullmatch(r"(slots|max_slots|max-slots)=(\d+)", f)
                if not m:
                    raise bad(f"unknown field {f!r} (expected slots=N)")
                if m.group(1) == "slots":
                    slots = int(m.group(2))
        elif fmt in ("mpich", "horovod"):
            if "slots=" in line:
                raise bad("this is Open MPI syntax (host slots=N); MPICH and horovod want 'host:N'")
            m = re.fullmatch(rf"({_HOST})(?::(\d+))?", line)
            if not m:
                raise bad("expected host or host:N")
            host, slots = m.group(1), int(m.group(2) or 1)
        else:
            raise HostfileError(f"unknown hostfile format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if slots < 1:
            raise bad("slots must be at least 1")
        if host in seen:
            raise bad(f"host {host} is listed already on line {seen[host]}")
        seen[host] = lineno
        hosts.append((host, slots))
    if not hosts:
        raise HostfileError(f"{source}: no hosts in it")
    return hosts


def read_hostfile(path: str, fmt: str) -> list:
    with open(path) as f:
        return parse_hostfile(f.read(), fmt, source=path)


# --------------------------------------------------------------------------- command line


def add_hostfile_parser(subparsers) -> argparse.ArgumentParser:
    """Add `hostfile` to the ringtrain command line."""
    p = subparsers.add_parser(
        "hostfile", help="write a hostfile from the SLURM allocation, or check one",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-slurm", action="store_true",
                     help="hosts and slots from SLURM_JOB_NODELIST and SLURM_TASKS_PER_NODE")
    src.add_argument("--check", metavar="FILE", help="validate FILE in --format; print hosts and total slots")
    p.add_argument("--format", choices=FORMATS, default="openmpi", help="dialect (default %(default)s)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=run_hostfile)
    return p


def run_hostfile(args) -> int:
    try:
        if args.check:
            hosts = read_hostfile(args.check, args.format)
            text = format_hostfile(hosts, args.format)
            sys.stderr.write(f"{args.check}: {len(hosts)} hosts, {sum(n for _, n in hosts)} slots\n")
        else:
            text = format_hostfile(slurm_hosts(), args.format)
    except (HostfileError, OSError) as e:
        print(f"ringtrain hostfile: {e}", file=sys.stderr)
        return 1
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    elif not args.check:
        sys.stdout.write(text)
    return 0
