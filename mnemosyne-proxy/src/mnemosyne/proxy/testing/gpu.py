"""GPU worker processes for ``tools/bench/proxy.py`` (the lead's GPU validation).

Each mode runs in its own process and prints one JSON line (``{"result": ...}``) last::

    python -m mnemosyne.proxy.testing.gpu train    --socket S --steps N --out F [--fault-step K]
    python -m mnemosyne.proxy.testing.gpu plain    --steps N --out F
    python -m mnemosyne.proxy.testing.gpu fill     --socket S --bytes B
    python -m mnemosyne.proxy.testing.gpu attach   --socket S
    python -m mnemosyne.proxy.testing.gpu steptime --mode plain|proxy|proxy-alloc [--socket S]
    python -m mnemosyne.proxy.testing.gpu checksum [--bytes B]

``train --fault-step K`` commits step K-1, then launches a torch kernel that writes far
outside a valid buffer during step K's forward: the CUDA context gets a sticky
illegal-address error and the process dies with it, while the proxy (another process and
context) keeps the state. ``checksum`` computes the device checksum of random device memory
with the numba-cuda kernel and with torch ops and compares both with the host definition.

Every mode closes its holder before it returns (pending commits marked, the commit thread
joined, the memory unmapped): a thread left inside a CUDA call at interpreter exit aborts the
process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

__all__ = ["main"]

_TENSOR_BYTES = 256 << 20


def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _deterministic() -> Any:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def _model(torch: Any, width: int = 1024, depth: int = 4) -> tuple[Any, Any]:
    torch.manual_seed(0)
    layers: list[Any] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 16)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _batch(torch: Any, step: int, width: int = 1024, batch: int = 256) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(batch, width, generator=g).cuda(), torch.randn(batch, 16, generator=g).cuda()


def _illegal_address(torch: Any) -> None:
    """Write to unmapped device memory with a torch kernel (torch and the driver only, no numba).

    torch checks view bounds against the size an object declares, not against what is
    mapped: a tensor over a valid pointer that claims to be huge lets ``fill_`` write to an
    address inside a reserved-but-unmapped virtual range (or, if the reservation lies below
    the buffer, 4 TiB past it), which the GPU reports as an illegal address.
    """
    from mnemosyne.proxy.arena.cuda import _check, _CudaMemory, _granularity, driver

    buf = torch.zeros(16, device="cuda")
    ptr = buf.data_ptr()
    gran = _granularity(torch.cuda.current_device())
    hole = int(_check(driver().cuMemAddressReserve(gran, gran, 0, 0), "cuMemAddressReserve"))
    target = hole if hole > ptr else ptr + (1 << 42)
    wild = torch.as_tensor(_CudaMemory(ptr, target - ptr + 4096), device="cuda")
    wild[target - ptr : target - ptr + 4096].fill_(1)
    try:
        torch.cuda.synchronize()  # raises: an illegal memory access was encountered
    except Exception as exc:
        # The context is poisoned for good; leave at once rather than through atexit
        # handlers that would touch CUDA again.
        print(f"trainer died: {exc}", file=sys.stderr, flush=True)
        os._exit(17)
    msg = "the out-of-bounds write did not fault"
    raise SystemExit(msg)


def _final(model: Any, opt: Any) -> dict[str, Any]:
    from mnemosyne.proxy.adopt import state_names

    return {k: v.detach().cpu().clone() for k, v in state_names(model, opt).items() if not k.startswith("scratch/")}


def _train(args: argparse.Namespace, use_proxy: bool) -> None:
    torch = _deterministic()
    model, opt = _model(torch)
    holder = None
    start = 1
    if use_proxy:
        from mnemosyne.proxy.adopt import adopt
        from mnemosyne.proxy.holder import ProxyStateHolder

        holder = ProxyStateHolder(args.socket)
        res = adopt(model, opt, holder)
        if res.status.value != "committed":
            msg = f"arena is {res.status.value}: {res.attach.reason}"
            raise SystemExit(msg)
        _say(event="attach", step=res.step, resumed=res.resumed, same_address=res.attach.same_address,
             seconds=res.attach.seconds)
        start = res.step + 1
        opt.zero_grad()
    for step in range(start, args.steps + 1):
        x, y = _batch(torch, step)
        if step == args.fault_step:
            # The fault strikes inside the forward, after the previous step's commit reached the
            # proxy (that takes microseconds once the GPU is done; flush makes it certain here).
            assert holder is not None
            holder.flush()
            _say(event="fault", step=step, kind="illegal-address")
            _illegal_address(torch)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if holder is not None:
            holder.begin_update(step)
        opt.step()
        if holder is not None:
            holder.commit(step)
        opt.zero_grad()
    torch.cuda.synchronize()
    torch.save(_final(model, opt), args.out)
    if holder is not None:
        holder.close(unmap=False)  # the model's tensors still point into the arena
    _say(result="done", start=start)


def _fill(args: argparse.Namespace) -> None:
    import torch

    from mnemosyne.proxy.holder import ProxyStateHolder

    holder = ProxyStateHolder(args.socket)
    holder.attach()
    holder.begin_update(0)
    n = 0
    for i in range(max(1, args.bytes // _TENSOR_BYTES)):
        t = holder.allocate(f"model/t{i}", "float32", (_TENSOR_BYTES // 4,), "cuda")
        t.fill_(float(i))
        n += t.numel() * 4
    del t
    torch.cuda.synchronize()
    holder.commit(0)
    holder.close()
    _say(result="filled", nbytes=n)


def _attach(args: argparse.Namespace) -> None:
    import torch

    from mnemosyne.proxy.holder import ProxyStateHolder

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # a trainer has its context before it attaches: do not time that
    holder = ProxyStateHolder(args.socket)
    t0 = time.perf_counter()
    res = holder.attach()
    seconds = time.perf_counter() - t0
    nbytes = sum(m.nbytes for m in res.meta.values())
    t = None
    for name, t in list(res.tensors.items())[:3] + list(res.tensors.items())[-2:]:
        want = float(name.removeprefix("model/t"))
        if not bool((t[:1024] == want).all()) or not bool((t[-1024:] == want).all()):
            msg = f"{name} does not hold its value after re-attach"
            raise SystemExit(msg)
    status, same, count = res.status.value, res.same_address, len(res.tensors)
    del res, t
    torch.cuda.synchronize()
    holder.close()
    _say(result="attached", seconds=seconds, nbytes=nbytes, status=status, same_address=same, tensors=count)


def _steptime(args: argparse.Namespace) -> None:
    torch = _deterministic()
    holder = None
    if args.mode != "plain":
        from mnemosyne.proxy.holder import ProxyStateHolder

        holder = ProxyStateHolder(args.socket)
        if args.mode == "proxy-alloc":  # before anything initialises CUDA in this process
            from mnemosyne.proxy.allocator import install_arena_allocator

            install_arena_allocator(holder, args.alloc_bytes)
    model, opt = _model(torch, width=args.width, depth=args.depth)
    if holder is not None:
        from mnemosyne.proxy.adopt import adopt

        adopt(model, opt, holder, on_torn="reinit")
    times = []
    marks = []  # seconds per step spent in begin_update + commit (the trainer's marker cost)
    x, y = _batch(torch, 0, args.width, args.batch)
    for step in range(1, args.warmup + args.steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m0 = holder.marker_seconds if holder is not None else 0.0
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if holder is not None:
            holder.begin_update(step)
        opt.step()
        if holder is not None:
            holder.commit(step)
        opt.zero_grad()
        torch.cuda.synchronize()
        if step > args.warmup:
            times.append(time.perf_counter() - t0)
            marks.append(holder.marker_seconds - m0 if holder is not None else 0.0)
    if holder is not None:
        holder.flush()
        st = holder.status()
        if st[0].value != "committed" or st[1] != args.warmup + args.steps:
            msg = f"after {args.warmup + args.steps} steps the proxy reports {st}"
            raise SystemExit(msg)
    params = sum(p.numel() for p in model.parameters())
    if holder is not None:  # the allocator (proxy-alloc) and the model still use the arena: no unmap
        holder.close(unmap=False)
    _say(result="steptime", mode=args.mode, median_s=statistics.median(times), mean_s=statistics.fmean(times),
         params=params, steps=len(times), marker_median_s=statistics.median(marks), marker_max_s=max(marks))


def _checksum(args: argparse.Namespace) -> None:
    """Both device checksum paths against the host definition, on the same random device bytes."""
    import numpy as np
    import torch

    from mnemosyne.proxy.arena.cuda import cuda_checksum, torch_device_checksum
    from mnemosyne.proxy.checksum import checksum_bytes, host_path

    torch.manual_seed(0)
    nbytes = args.bytes + 5  # a partial last word too
    buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    want = checksum_bytes(np.ascontiguousarray(buf.cpu().numpy()))
    out: dict[str, Any] = {"nbytes": nbytes, "host": want, "host_path": host_path()}
    for name, fn in (("torch", torch_device_checksum), ("numba-cuda", None)):
        t0 = time.perf_counter()
        try:
            if fn is None:
                value = cuda_checksum(buf.data_ptr(), nbytes)
            else:
                value = fn(buf.data_ptr(), nbytes, buf.device.index)
            torch.cuda.synchronize()
            out[name] = {"equal": value == want, "seconds": time.perf_counter() - t0}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    _say(result="checksum", **out)


def main(argv: list[str] | None = None) -> int:
    """Run one worker mode."""
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "plain", "fill", "attach", "steptime", "checksum"])
    p.add_argument("--socket", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--fault-step", type=int, default=-1)
    p.add_argument("--bytes", type=int, default=1 << 30)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--alloc-bytes", type=int, default=8 << 30)
    p.add_argument("--batch", type=int, default=2048)
    args, rest = p.parse_known_args(argv)
    if args.mode == "steptime":
        sp = argparse.ArgumentParser()
        sp.add_argument("--mode", choices=["plain", "proxy", "proxy-alloc"], required=True)
        args.mode = sp.parse_args(rest).mode
        _steptime(args)
    elif rest:
        p.error(f"unknown arguments {rest}")
    elif args.mode == "train":
        _train(args, use_proxy=True)
    elif args.mode == "plain":
        _train(args, use_proxy=False)
    elif args.mode == "fill":
        _fill(args)
    elif args.mode == "checksum":
        _checksum(args)
    else:
        _attach(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
