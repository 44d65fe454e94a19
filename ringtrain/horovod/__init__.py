"""Horovod's PyTorch API on ringtrain's pure-MPI ring: change one import line.

    import ringtrain.horovod as hvd            # instead of: import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    ...                                        # the usual loop: backward(), optimizer.step()

Launch like any MPI program: `mpirun -n 4 python train.py`, or `horovodrun -np 4
--binding-args="--bind-to none --map-by slot" python train.py` (horovodrun's MPI controller;
`--gloo` starts ranks without MPI, which this module cannot run on).

RINGTRAIN_HOROVOD=real makes this module re-export Horovod itself (`horovod.torch`), so one
script can be run both ways. By default everything runs on ringtrain.ring with no Horovod
installed. Collectives must be submitted in the same order on every rank (there is no
negotiation, see ops.py); mismatches raise HorovodMismatchError on every rank.

Implemented: init, shutdown, is_initialized, rank, size, local_rank, local_size, cross_rank,
cross_size, allreduce(_)(_async), grouped_allreduce*, allgather(_async), broadcast(_)(_async),
broadcast_parameters, broadcast_optimizer_state, broadcast_object / allgather_object (JSON,
not pickle), barrier, join, poll, synchronize, DistributedOptimizer, Compression, Average,
Sum, Min, Max, Product, *_built / *_enabled. Raise NotImplementedError: Adasum, alltoall,
reducescatter, process sets, SyncBatchNorm, timelines, elastic. Extra: comm_stats() gives
this rank's communication time and ring bytes.
"""
import os as _os

IMPLEMENTATION = "horovod" if _os.environ.get("RINGTRAIN_HOROVOD", "").lower() == "real" else "ringtrain"

if IMPLEMENTATION == "horovod":
    from horovod.torch import *  # noqa: F401,F403  (Horovod itself, on request)
    from horovod.torch import DistributedOptimizer, Compression  # noqa: F401
else:
    from ringtrain.horovod.compression import Compression  # noqa: F401
    from ringtrain.horovod.functions import (  # noqa: F401
        allgather_object,
        broadcast_object,
        broadcast_optimizer_state,
        broadcast_parameters,
    )
    from ringtrain.horovod.ops import (  # noqa: F401
        Adasum,
        Average,
        Handle,
        HorovodInternalError,
        HorovodMismatchError,
        Max,
        Min,
        ProcessSet,
        Product,
        Sum,
        SyncBatchNorm,
        add_process_set,
        allgather,
        allgather_async,
        allreduce,
        allreduce_,
        allreduce_async,
        allreduce_async_,
        alltoall,
        alltoall_async,
        barrier,
        broadcast,
        broadcast_,
        broadcast_async,
        broadcast_async_,
        ccl_built,
        comm_stats,
        cross_rank,
        cross_size,
        cuda_built,
        ddl_built,
        gloo_built,
        gloo_enabled,
        global_process_set,
        grouped_allgather,
        grouped_allgather_async,
        grouped_allreduce,
        grouped_allreduce_,
        grouped_allreduce_async,
        grouped_allreduce_async_,
        grouped_reducescatter,
        grouped_reducescatter_async,
        init,
        is_homogeneous,
        is_initialized,
        join,
        local_rank,
        local_size,
        mpi_built,
        mpi_enabled,
        mpi_threads_supported,
        nccl_built,
        poll,
        rank,
        reducescatter,
        reducescatter_async,
        remove_process_set,
        rocm_built,
        shutdown,
        size,
        sparse_allreduce_async,
        start_timeline,
        stop_timeline,
        synchronize,
    )
    from ringtrain.horovod.optimizer import DistributedOptimizer  # noqa: F401
