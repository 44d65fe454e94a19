# Sourced by every jobs/*.sbatch: finds python and mpirun, sets the run directory.
# Submit from the ringtrain checkout (sbatch records it as SLURM_SUBMIT_DIR), or set RINGTRAIN_HOME.
#
# Knobs (environment variables; sbatch passes the submitting shell's environment on):
#   RINGTRAIN_PYTHON   python with ringtrain installed (default: CHECKOUT/.venv/bin/python if it
#                      exists, else python on PATH)
#   RINGTRAIN_MPIRUN   mpirun to use (default: the one beside that python, e.g. pip's Open MPI in
#                      the venv, else mpirun on PATH)
#   MPIRUN_ARGS        extra mpirun options, e.g. "--mca btl tcp,self"
#   RUN_ROOT           parent folder of run directories (default: CHECKOUT/runs)
#   RUN_DIR            this job's run directory (default: RUN_ROOT/JOBNAME-JOBID)
RINGTRAIN_HOME=${RINGTRAIN_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$RINGTRAIN_HOME"
if [ -z "${RINGTRAIN_PYTHON:-}" ]; then
    if [ -x "$RINGTRAIN_HOME/.venv/bin/python" ]; then RINGTRAIN_PYTHON=$RINGTRAIN_HOME/.venv/bin/python
    else RINGTRAIN_PYTHON=$(command -v python3 || command -v python); fi
fi
if [ -z "${RINGTRAIN_MPIRUN:-}" ]; then
    RINGTRAIN_MPIRUN=$(dirname "$RINGTRAIN_PYTHON")/mpirun
    [ -x "$RINGTRAIN_MPIRUN" ] || RINGTRAIN_MPIRUN=mpirun
fi
# The checkout being submitted from wins over any installed copy of ringtrain.
if [ -d "$RINGTRAIN_HOME/ringtrain" ]; then export PYTHONPATH=$RINGTRAIN_HOME${PYTHONPATH:+:$PYTHONPATH}; fi
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
NTASKS=${SLURM_NTASKS:-1}
RUN_ROOT=${RUN_ROOT:-$RINGTRAIN_HOME/runs}
RUN_DIR=${RUN_DIR:-$RUN_ROOT/${SLURM_JOB_NAME:-ringtrain}-${SLURM_JOB_ID:-$$}}
mkdir -p "$RUN_DIR"

# More tasks on a node than it has cores (a partition with OverSubscribe, or a test machine):
# Open MPI refuses to bind them to cores, so leave them unbound.
TASKS_ON_NODE=${SLURM_TASKS_PER_NODE:-$NTASKS}
TASKS_ON_NODE=${TASKS_ON_NODE%%[(,]*}
if [ "$TASKS_ON_NODE" -gt "$(nproc)" ]; then
    MPIRUN_ARGS="--oversubscribe --bind-to none ${MPIRUN_ARGS:-}"
fi

# mpirun -n N python -m ringtrain ARGS...
ringtrain_mpirun() {
    local n=$1; shift
    # shellcheck disable=SC2086
    "$RINGTRAIN_MPIRUN" -n "$n" ${MPIRUN_ARGS:-} "$RINGTRAIN_PYTHON" -m ringtrain "$@"
}

echo "job ${SLURM_JOB_ID:-none} on ${SLURM_JOB_NODELIST:-$(hostname)}: $NTASKS tasks; python $RINGTRAIN_PYTHON;" \
     "mpirun $RINGTRAIN_MPIRUN; run dir $RUN_DIR"
