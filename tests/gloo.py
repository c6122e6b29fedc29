"""What every multi-process test here starts with: a free port on 127.0.0.1 and a gloo process
group over it, with one torch thread a process (2 processes share the 2 cores)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int) -> None:
    """Joins the gloo group of ``world`` processes on 127.0.0.1:``port`` as ``rank``."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
