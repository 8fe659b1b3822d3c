"""Process start-up: one place that turns torchrun / deepspeed / mpirun environments into ranks."""
from __future__ import annotations

import os

import torch


def export_mpi_env() -> None:
    """Under mpirun, expose Open MPI's rank variables the way torch.distributed expects.

    DeepSpeed's own MPI discovery sets MASTER_ADDR from `hostname -I`, which is not loopback on
    these machines; exporting the variables first makes it skip discovery."""
    if "OMPI_COMM_WORLD_RANK" in os.environ and "RANK" not in os.environ:
        os.environ["RANK"] = os.environ["OMPI_COMM_WORLD_RANK"]
        os.environ["WORLD_SIZE"] = os.environ["OMPI_COMM_WORLD_SIZE"]
        os.environ["LOCAL_RANK"] = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU); returns rank, world, device."""
    import deepspeed

    # ARBD_CUDA_BACKEND=gloo moves CUDA tensors over gloo (through host memory) so that several
    # ranks can share one GPU: a debugging mode that exercises the multi-rank code paths on a
    # one-GPU machine (NCCL refuses two ranks on one device). Never for speed.
    cuda_backend = os.environ.get("ARBD_CUDA_BACKEND", "nccl")
    if cuda_backend not in ("nccl", "gloo"):
        raise ValueError(f"ARBD_CUDA_BACKEND={cuda_backend!r}: use 'nccl' (the default) or 'gloo' "
                         "(several ranks sharing one GPU, for debugging)")
    export_mpi_env()
    if "RANK" not in os.environ:  # a plain `python launch/pretrain.py`: one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda and cuda_backend == "gloo":
        local %= torch.cuda.device_count()
        os.environ["LOCAL_RANK"] = str(local)  # DeepSpeed's engine picks its device from it
    if cuda and not torch.distributed.is_initialized():
        # Both backends in every group: CUDA tensors (activations, rows, evidence) go over NCCL,
        # the small CPU control tensors (flags, counts, agreement checks) over gloo. DeepSpeed
        # then finds the group initialised and keeps it.
        torch.cuda.set_device(local)
        torch.distributed.init_process_group(f"cpu:gloo,cuda:{cuda_backend}")
    deepspeed.init_distributed(dist_backend=cuda_backend if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if cuda:
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")
