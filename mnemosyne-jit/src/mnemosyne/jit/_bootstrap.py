"""Entry point of every process the agent starts: ``python -m mnemosyne.jit._bootstrap``.

A trainer runs the user's script (``script.py args`` or ``-m module args``) as
``__main__`` right away. A pre-warmed spare (``--spare-id N``) first imports torch and
initialises the device, reports ready in the store, and waits for the agent to assign it
a rank; it then runs the script exactly as a trainer would, minus the import time.

Each process names itself for ``ps``/``top``/``pgrep`` (``PR_SET_NAME``): ``mnemo-r<rank>``
for a trainer, ``mnemo-spare`` for a spare until it is assigned a rank (``ps -o
pid,comm,args``, ``pgrep -l mnemo-r``; ``ps aux`` shows the unchanged command line).
"""

from __future__ import annotations

import atexit
import ctypes
import faulthandler
import json
import os
import runpy
import signal
import sys
import time
import traceback

__all__ = ["main"]


def set_process_name(name: str) -> None:
    """Name this process (its main thread) as ``ps -o comm``, ``top`` and ``pgrep`` show it.

    Linux ``prctl(PR_SET_NAME)``: at most 15 bytes, longer names are cut. Threads started
    afterwards inherit the name. Does nothing where prctl is not available.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _run_user(cmd: list[str]) -> None:
    if not cmd:
        sys.exit("mnemosyne.jit._bootstrap: no training script given")
    if cmd[0] == "-m":
        sys.argv = [cmd[1], *cmd[2:]]
        runpy.run_module(cmd[1], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(cmd[0])
        sys.argv = [cmd[0], *cmd[1:]]
        sys.path.insert(0, os.path.dirname(script))
        runpy.run_path(script, run_name="__main__")


def _warm_up() -> None:
    """Pay, ahead of time, what a replacement would pay after the failure.

    Importing torch is the largest part; torch also imports big modules lazily on first
    use (the optimizer constructor imports torch._dynamo, seconds on a loaded host), so
    a tiny model takes one optimizer step here.
    """
    import torch
    import torch.distributed
    import torch.utils.data

    if torch.cuda.is_available():
        torch.cuda.init()
    w = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(w.parameters())
    w(torch.ones(2, 4)).sum().backward()
    opt.step()


def _wait_assignment(spare_id: int) -> None:
    _warm_up()
    from mnemosyne.core.env import (
        MNEMOSYNE_EPOCH,
        MNEMOSYNE_JOB_ID,
        MNEMOSYNE_LOCAL_RANK,
        MNEMOSYNE_PROXY_SOCKET,
        MNEMOSYNE_RANK,
        MNEMOSYNE_SPARE,
        MNEMOSYNE_STORE_ADDR,
        MNEMOSYNE_TOKEN,
        MNEMOSYNE_WORLD_SIZE,
    )
    from mnemosyne.jit import _keys, runtime  # noqa: F401  (warm the runtime's imports too)
    from mnemosyne.jit._select import use_ccl
    from mnemosyne.jit._store import connect_job_store

    if use_ccl():  # warm ccl's backend too: the replacement repairs through it
        import mnemosyne.ccl.gloo  # noqa: F401
    store = connect_job_store(os.environ[MNEMOSYNE_STORE_ADDR], os.environ[MNEMOSYNE_JOB_ID],
                              os.environ.get(MNEMOSYNE_TOKEN))
    store.set(_keys.spare_ready(spare_id), str(os.getpid()).encode())
    while True:
        if store.check([_keys.spare_assign(spare_id)]):
            body = json.loads(store.get(_keys.spare_assign(spare_id)))
            break
        if store.check([_keys.spare_stop(spare_id)]):
            sys.exit(0)
        time.sleep(0.005)
    os.environ[MNEMOSYNE_RANK] = str(body["rank"])
    os.environ[MNEMOSYNE_LOCAL_RANK] = str(body["local_rank"])
    os.environ[MNEMOSYNE_EPOCH] = str(body["epoch"])
    os.environ[MNEMOSYNE_WORLD_SIZE] = str(body["world_size"])
    if body.get("proxy_socket"):  # mnemo launch --proxy: the device proxy of the assigned slot
        os.environ[MNEMOSYNE_PROXY_SOCKET] = str(body["proxy_socket"])
    os.environ.pop(MNEMOSYNE_SPARE, None)


def main(argv: list[str] | None = None) -> None:
    """Run a trainer or a spare (see module doc)."""
    args = list(sys.argv[1:] if argv is None else argv)
    faulthandler.enable()
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a stuck
    # rank waits without a debugger.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    spare_id = None
    if args[:1] == ["--spare-id"]:
        spare_id = int(args[1])
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if spare_id is not None:
        set_process_name("mnemo-spare")
        _wait_assignment(spare_id)
    from mnemosyne.core.env import MNEMOSYNE_RANK

    set_process_name(f"mnemo-r{os.environ.get(MNEMOSYNE_RANK, '')}")
    code = 0
    try:
        _run_user(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    # The script is over. Run its atexit handlers, then leave without the interpreter's
    # teardown: it only destroys objects, took seconds on a loaded host, and would
    # block on communicators parked with abandoned operations (see _comm).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
