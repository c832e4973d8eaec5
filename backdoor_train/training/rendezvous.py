"""DDP's rendezvous store, bound to the one address it is reached at.

Ray Train sets up each worker group's process group through torch's ``env://`` rendezvous:
rank 0 hosts a TCPStore at ``MASTER_ADDR:MASTER_PORT`` (its node's address) and every rank
trusts what it reads there. Torch binds that store to every interface, whatever MASTER_ADDR
is: on a laptop whose Ray cluster listens on loopback only, the store was the one socket of a
run reachable from the network (seen with a socket listing during a run; tests/test_exposure.py).

``StoreBoundTorchConfig`` is Ray's ``TorchConfig`` whose backend first makes each worker's
rendezvous bind rank 0's store to MASTER_ADDR alone (through the listening socket that
``TCPStore`` accepts as ``master_listen_fd``), then sets the group up exactly as Ray does. On a
cluster MASTER_ADDR is the node's address, which the other nodes reach; nothing else changes.
This module imports Ray and torch: import it only where a trainer is built (the CLI must not
import Ray before raysession.prepare_local_cluster).
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig

from backdoor_train.training.rayinternals import torch_backend_class


def bind_store_to_master_addr() -> None:
    """Make this process's torch rendezvous host rank 0's store on its host address only."""
    import importlib

    from torch.distributed import TCPStore

    # The module, not torch.distributed's function of the same name.
    rdzv = importlib.import_module("torch.distributed.rendezvous")

    original = rdzv._create_c10d_store
    if getattr(original, "bound_to_host", False):
        return

    def create_store(hostname: str, port: int, rank: int, world_size: int, timeout: Any,
                     use_libuv: bool = True) -> Any:
        agent_serves = getattr(rdzv, "_agent_store_serves", lambda h, p: rdzv._torchelastic_use_agent_store())
        if rank != 0 or agent_serves(hostname, port):  # a client, or torchelastic hosts the store
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        listener = socket.socket(socket.AF_INET6 if ":" in hostname else socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((hostname, port))
            listener.listen(socket.SOMAXCONN)
        except OSError as exc:  # not an address of this host: torch's own store, on every interface
            listener.close()
            print(f"WARNING: the DDP rendezvous store cannot bind {hostname}:{port} ({exc}); it listens on "
                  f"every interface", file=sys.stderr)
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        return TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                        master_listen_fd=listener.detach(), use_libuv=use_libuv)

    create_store.bound_to_host = True  # type: ignore[attr-defined]
    rdzv._create_c10d_store = create_store


class _StoreBoundTorchBackend(torch_backend_class()):  # type: ignore[misc]
    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        worker_group.execute(bind_store_to_master_addr)
        super().on_start(worker_group, backend_config)


@dataclass
class StoreBoundTorchConfig(TorchConfig):
    """Ray's ``TorchConfig`` (same fields) with the rendezvous store bound to MASTER_ADDR."""

    @property
    def backend_cls(self) -> type:
        return _StoreBoundTorchBackend
