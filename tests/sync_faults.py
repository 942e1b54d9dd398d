"""Jobs that fail on purpose, for tests/test_sync.py: the worker processes import this module by
name (it must stay free of test-only imports so that a worker can load it quickly)."""
import os
import time


def no_state(rank, size):
    """A pool init that sets nothing up."""
    return rank


def crash_or_allreduce(worker, crash_rank):
    """Rank `crash_rank` dies (exit code 3) while the others wait in a real all-reduce."""
    if worker.rank == crash_rank:
        os._exit(3)
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.ones(1))
    return "reduced"


def hang_or_allreduce(worker, hang_rank):
    """Rank `hang_rank` hangs (sleeps 10 minutes) while the others wait in a real all-reduce,
    which must time out."""
    if worker.rank == hang_rank:
        time.sleep(600)
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.ones(1))
    return "reduced"


def sleep(state, seconds):
    time.sleep(seconds)
    return seconds


def pid(state):
    return os.getpid()
