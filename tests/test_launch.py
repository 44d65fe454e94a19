"""Launcher detection and the cross-check against MPI's own rank and size.

Environments are written out the way each launcher sets them (measured where the launcher is
installed here: Open MPI 5 mpirun, SLURM 22.05 srun and sbatch); no MPI is started.
"""
import pytest

from ringtrain.world import LaunchError, check_launch, detect_launcher


def info(**env):
    return detect_launcher({k: str(v) for k, v in env.items()})


def test_plain_python_is_a_singleton():
    i = info()
    assert i.launcher == "singleton" and i.env_size is None
    check_launch(i, 0, 1)


def test_reads_os_environ_by_default(monkeypatch):
    for k in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    i = detect_launcher()
    assert (i.launcher, i.env_rank, i.env_size, i.env_local_rank) == ("mpirun", 1, 3, 1)


def test_mpirun():
    i = info(OMPI_COMM_WORLD_RANK=2, OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_LOCAL_RANK=0, PMIX_RANK=2)
    assert (i.launcher, i.env_rank, i.env_size, i.env_local_rank) == ("mpirun", 2, 4, 0)
    check_launch(i, 2, 4)


def test_mpirun_inside_sbatch_may_use_fewer_ranks_than_tasks():
    # What ranks of `mpirun -n 2` see inside `sbatch -n 4` (SLURM_PROCID=0 comes from the batch step).
    i = info(OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=2, SLURM_JOB_ID=7, SLURM_NTASKS=4, SLURM_PROCID=0)
    assert i.launcher == "mpirun" and i.slurm_job_id == "7" and i.slurm_ntasks == 4
    check_launch(i, 1, 2)


def test_mpirun_across_slurm_nodes_is_not_srun():
    # Open MPI starts its daemons with srun, so ranks inherit that step's variables.
    i = info(OMPI_COMM_WORLD_RANK=5, OMPI_COMM_WORLD_SIZE=8, SLURM_STEP_ID=0, SLURM_PROCID=1,
             SLURM_STEP_NUM_TASKS=2, SLURM_JOB_ID=9, SLURM_NTASKS=8)
    assert i.launcher == "mpirun" and (i.env_rank, i.env_size) == (5, 8)
    check_launch(i, 5, 8)


def test_mpirun_of_another_mpi_library():
    # Open MPI's mpirun, mpi4py built against MPICH: every rank is a singleton.
    i = info(OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=2)
    with pytest.raises(LaunchError, match="different MPI library"):
        check_launch(i, 0, 1)


def test_horovodrun_over_mpi_and_gloo():
    i = info(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=2, HOROVOD_STALL_CHECK_TIME_SECONDS=60)
    assert i.launcher == "horovodrun"
    check_launch(i, 0, 2)
    g = info(HOROVOD_RANK=1, HOROVOD_SIZE=2, HOROVOD_LOCAL_RANK=1, HOROVOD_GLOO_RENDEZVOUS_ADDR="127.0.0.1")
    assert (g.launcher, g.env_rank, g.env_size) == ("horovodrun", 1, 2)
    with pytest.raises(LaunchError, match="horovodrun --mpi"):
        check_launch(g, 0, 1)


def test_hydra_with_and_without_slurm():
    i = info(PMI_RANK=3, PMI_SIZE=4, MPI_LOCALRANKID=1, PMI_FD=5)
    assert (i.launcher, i.env_rank, i.env_size, i.env_local_rank) == ("mpiexec-hydra", 3, 4, 1)
    check_launch(i, 3, 4)
    # Hydra inside an allocation starts its proxies with srun, but MPI_LOCALRANKID is Hydra's own.
    j = info(PMI_RANK=3, PMI_SIZE=4, MPI_LOCALRANKID=1, SLURM_STEP_ID=0, SLURM_PROCID=1, SLURM_JOB_ID=3)
    assert j.launcher == "mpiexec-hydra"


def test_srun_with_pmi2_and_pmix():
    i = info(PMI_RANK=1, PMI_SIZE=2, SLURM_STEP_ID=0, SLURM_PROCID=1, SLURM_LOCALID=1, SLURM_JOB_ID=4)
    assert (i.launcher, i.env_size, i.env_local_rank) == ("srun", 2, 1)
    check_launch(i, 1, 2)
    x = info(PMIX_RANK=2, SLURM_STEP_ID=0, SLURM_STEP_NUM_TASKS=3, SLURM_NTASKS=3, SLURM_PROCID=2, SLURM_JOB_ID=4)
    assert (x.launcher, x.env_rank, x.env_size) == ("srun", 2, 3)
    check_launch(x, 2, 3)


def test_srun_singletons_are_an_error_that_says_how_to_launch():
    # Exactly what `srun -n 2` sets here (SLURM 22.05, pip Open MPI without SLURM's PMI).
    env = dict(SLURM_JOB_ID=2, SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_LOCALID=1, SLURM_STEPID=0, SLURM_STEP_ID=0,
               SLURM_STEP_NUM_TASKS=2, SLURM_STEP_NODELIST="localhost")
    i = info(**env)
    assert (i.launcher, i.env_rank, i.env_size) == ("srun", 1, 2)
    with pytest.raises(LaunchError) as e:
        check_launch(i, 0, 1)
    msg = str(e.value)
    assert "singleton" in msg and "mpirun -n $SLURM_NTASKS" in msg and "--mpi=pmix" in msg


def test_srun_step_smaller_than_the_allocation():
    # `srun -n 2` inside `sbatch -n 4`: the step has 2 tasks; that is the world.
    i = info(SLURM_JOB_ID=5, SLURM_NTASKS=2, SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=0, SLURM_STEP_ID=1, PMIX_RANK=0)
    check_launch(i, 0, 2)


def test_torchrun_is_not_an_mpi_launcher():
    i = info(RANK=1, LOCAL_RANK=1, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, TORCHELASTIC_RUN_ID="x")
    assert (i.launcher, i.env_rank, i.env_size) == ("torchrun", 1, 2)
    with pytest.raises(LaunchError, match="torchrun starts processes but no MPI job"):
        check_launch(i, 0, 1)
    check_launch(info(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1), 0, 1)


def test_directly_in_a_batch_script_of_several_tasks():
    i = info(SLURM_JOB_ID=8, SLURM_NTASKS=4, SLURM_PROCID=0, SLURM_LOCALID=0)
    assert i.launcher == "singleton" and i.slurm_ntasks == 4
    with pytest.raises(LaunchError, match=r"mpirun -n \$SLURM_NTASKS"):
        check_launch(i, 0, 1)
    check_launch(info(SLURM_JOB_ID=8, SLURM_NTASKS=1, SLURM_PROCID=0), 0, 1)


def test_rank_disagreement():
    i = info(OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=2)
    with pytest.raises(LaunchError, match="says this is rank 1, MPI says 0"):
        check_launch(i, 0, 2)
