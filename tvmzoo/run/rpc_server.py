"""`python -m tvmzoo.run.rpc_server [TVM's rpc_server arguments]`: TVM's RPC server (tvm.exec.rpc_server,
its own command line) whose serving process asks Linux for AMX state first (tvmzoo.run.host.request_amx),
so modules with AMX kernels run on it: TVM's server never asks, and the first tile instruction would be
SIGILL. TVM serves from a fresh worker process (a PopenWorker), so the request goes in as the server's
`server_init_callback`, which runs there; the sessions it forks inherit the permission."""
from __future__ import annotations

import functools
import runpy

from tvm import rpc

from .host import request_amx

if __name__ == "__main__":
    rpc.Server = functools.partial(rpc.Server, server_init_callback=request_amx)  # tvm.exec.rpc_server calls it
    runpy.run_module("tvm.exec.rpc_server", run_name="__main__", alter_sys=True)
