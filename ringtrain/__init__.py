"""ringtrain: data-parallel PyTorch training over MPI, with every step's compute and
communication measured and logged to HDF5.

Where things live:
    ring.py       the pure mpi4py ring all-reduce (reduce-scatter, then all-gather)
    world.py      the MPI world: ranks, launcher, clock alignment, abort-on-error
    schemes/      one module per gradient-exchange scheme, all behind schemes/base.py
    trainer.py    the training loop (imports no MPI)
    steplog.py    the per-rank HDF5 step log
    cli.py        `ringtrain train | bench | report | cluster`
"""
__version__ = "0.1.0"
