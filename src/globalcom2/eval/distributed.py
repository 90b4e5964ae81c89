"""This process's place in a ``torchrun`` / ``accelerate launch`` job, and the barriers between ranks.

:class:`DistEnv` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and uses torch.distributed (gloo
on CPU, nccl on CUDA) for barriers only; the runner (:mod:`globalcom2.eval.runner`) shards the work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

#: How long a rank waits at a barrier for the others (slow model loading, unbalanced shards).
BARRIER_TIMEOUT = timedelta(hours=3)


@dataclass
class DistEnv:
    """This process's place in a ``torchrun`` / ``accelerate launch`` job (1 process by default).

    Attributes:
        rank: global rank (``RANK``).
        world_size: number of processes (``WORLD_SIZE``).
        local_rank: rank on this machine (``LOCAL_RANK``): the GPU index used.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _owns_group: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DistEnv:
        """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (absent: a single process).

        Raises:
            ValueError: a value that is not a non-negative integer, or rank >= world size.
        """
        env = os.environ if environ is None else environ

        def read(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
            if value < 0:
                raise ValueError(f"environment variable {name}={raw!r} is negative")
            return value

        world = read("WORLD_SIZE", 1)
        rank = read("RANK", 0)
        local = read("LOCAL_RANK", rank)
        if world < 1:
            raise ValueError(f"environment variable WORLD_SIZE={world} must be >= 1")
        if rank >= world:
            raise ValueError(f"RANK={rank} must be < WORLD_SIZE={world}")
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        """``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def init(self, backend: str | None = None) -> None:
        """Join the process group (``env://``) when distributed and not joined yet.

        ``backend``: ``"nccl"`` or ``"gloo"``; default nccl when CUDA is available, else gloo.
        """
        if not self.is_distributed:
            return
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if dist.is_initialized():
            return
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(
            backend, init_method="env://", rank=self.rank, world_size=self.world_size, timeout=BARRIER_TIMEOUT
        )
        self._owns_group = True

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process). Joins the group if needed."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        self.init()
        if dist.get_backend() == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()

    def shutdown(self) -> None:
        """Leave the process group if :meth:`init` created it."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False
