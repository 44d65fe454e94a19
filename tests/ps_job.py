"""An MPI job that drives a parameter-server scheme directly (no trainer), for the shutdown
tests in test_ps.py:

    mpirun -n 4 python tests/ps_job.py BACKEND uneven     # worker w runs 3 + 2w steps
    mpirun -n 3 python tests/ps_job.py BACKEND stall T    # the server stops answering; workers time out after T s

Prints `worker W done STEPS` on each worker that finished.
"""
import sys
import time

import torch

from ringtrain.schemes import make_scheme
from ringtrain.world import World, install_abort_on_error


def main():
    backend, mode = sys.argv[1], sys.argv[2]
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    install_abort_on_error()
    world = World.init(align_clocks=False)
    torch.set_num_threads(1)
    scheme = make_scheme(backend, world, {"ps_servers": 1, "ps_timeout": timeout})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if not scheme.is_worker:
        if mode == "stall":
            scheme._connect()  # joins the set-up, then never serves: a hung server
            time.sleep(3600)
        scheme.serve()
        scheme.close()
        return
    scheme.setup(model, opt)
    steps = 3 + 2 * scheme.worker_rank if mode == "uneven" else 3
    x = torch.randn(16, 7, generator=torch.Generator().manual_seed(scheme.worker_rank))
    for step in range(steps):
        scheme.begin_step(step)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        scheme.end_backward()
        scheme.optimizer_step(opt)
        st = scheme.end_step()
        assert st.bytes_sent == st.bytes_recv == 4 * sum(p.numel() for p in model.parameters())
    scheme.close()
    print(f"worker {scheme.worker_rank} done {steps}", flush=True)


if __name__ == "__main__":
    main()
