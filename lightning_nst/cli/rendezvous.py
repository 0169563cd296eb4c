"""Waiting for the other processes of a multi-process run: stoppable at once, and for at most ``node_wait`` seconds.

A run of several processes (``--trainer.num_nodes``, ``--trainer.devices`` with DDP, torchrun, SLURM) starts by
meeting its peers: torch's ``init_process_group``, inside Lightning's ``DDPStrategy.setup_environment``. It blocks
in C++ until every process has joined, so the Python signal handlers by which a run stops on SIGTERM or Ctrl-C
(:mod:`lightning_nst.cli.signals`) never run there, and it waits Lightning's default of 30 minutes. Around that
wait alone, SIGTERM and SIGINT take their default action (the process ends at once: nothing has been computed yet),
and the wait ends after ``node_wait`` seconds with one line naming what it waited for.

A process that met its peers also leaves them properly: its process group is destroyed at exit, while Python is still
alive. Lightning does so for NCCL alone; a Gloo group (CPU runs) left to the interpreter's finalization aborts the
process now and then ("terminate called without an active exception", SIGABRT) after its work is done, which a
launcher reports as a failed run.
"""

from __future__ import annotations

import atexit
import signal
import threading
from datetime import timedelta
from typing import Any

from lightning_nst.core.errors import NSTError

NODE_WAIT = 600.0
"""Seconds a process waits for the others of its run by default (``--node_wait``)."""


def _waited_for(trainer: Any, seconds: float) -> str:
    """The one line of a process that gave up waiting for the others."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    address = f"{environment.main_address}:{environment.main_port}" if environment is not None else "its main address"
    nodes, world = trainer.num_nodes, trainer.world_size
    if trainer.global_rank == 0:
        waited = f"waited {seconds:g} s for the other {world - 1} process(es) of this run ({nodes} node(s), "
        waited += f"{world} processes in all) to join it at {address}"
    else:
        waited = f"node {trainer.node_rank} waited {seconds:g} s for node 0 at {address} to accept it"
    return (
        f"node_wait: {waited}; start every node with the same --trainer.num_nodes and MASTER_ADDR/MASTER_PORT "
        "(or through torchrun or SLURM), or give them longer with --node_wait SECONDS"
    )


def guard(trainer: Any, node_wait: float | None) -> None:
    """Make ``trainer``'s wait for its peers stoppable by a signal and at most ``node_wait`` seconds long.

    Nothing changes for a run of one process. Lightning offers no hook between the launch and the rendezvous, so the
    strategy's ``setup_environment`` of this trainer is wrapped, and its ``timeout`` set (``DDPStrategy(timeout=)``,
    which it passes to ``init_process_group``); once the peers have met, the process group's collectives get the
    strategy's own timeout back (Lightning's 30 minutes by default).
    """
    seconds = NODE_WAIT if node_wait is None else float(node_wait)
    if not seconds > 0:  # NaN too
        raise NSTError(f"node_wait: must be a number of seconds > 0, got {node_wait!r}")
    strategy = trainer.strategy
    if trainer.world_size <= 1 or not hasattr(strategy, "_timeout"):
        return
    collectives = strategy._timeout  # Lightning's 30 minutes, or the config's DDPStrategy(timeout=...)
    strategy._timeout = timedelta(seconds=seconds)
    setup_environment = strategy.setup_environment

    def waiting_stoppably() -> None:
        import torch.distributed
        from lightning.fabric.utilities.distributed import _destroy_dist_connection

        main_thread = threading.current_thread() is threading.main_thread()
        stops = (signal.SIGINT, signal.SIGTERM) if main_thread else ()
        previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in stops}
        try:
            setup_environment()
        except torch.distributed.DistError as error:
            raise NSTError(_waited_for(trainer, seconds)) from error
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # Lightning's exit handler, which it registers for NCCL alone; a no-op where it already ran.
        atexit.register(_destroy_dist_connection)
        # The wait for peers is over; a process done with its work may wait at a barrier for a slower one for longer.
        if collectives is not None and hasattr(torch.distributed, "set_timeout"):
            torch.distributed.set_timeout(collectives)

    strategy.setup_environment = waiting_stoppably
