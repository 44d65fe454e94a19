#!/usr/bin/env bash
# Stop the single-node SLURM started by scripts/slurm_up.sh (slurmd, slurmctld, munged).
# Idempotent. The scratch folder ($RINGTRAIN_SLURM_DIR, default /tmp/ringtrain-slurm) is kept
# for its logs; pass --purge to delete it too (job state is lost then).
set -uo pipefail

D=${RINGTRAIN_SLURM_DIR:-/tmp/ringtrain-slurm}

stop() {  # stop NAME PIDFILE: TERM, wait up to 10 s, then KILL
    local pidfile=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "stopped $1 ($pid)"
    fi
    rm -f "$pidfile"
}

stop slurmd "$D/slurmd.pid"
stop slurmctld "$D/slurmctld.pid"
# munged keeps its pid in a fixed place; stop it only if slurm_up.sh started it.
if [ -f "$D/munged.ours" ]; then
    stop munged /run/munge/munged.pid
    rm -f "$D/munged.ours"
fi

if [ "${1:-}" = "--purge" ]; then
    rm -rf "$D"
    echo "removed $D"
fi
exit 0
