"""GPU worker processes for ``tools/bench/proxy.py`` (the lead's GPU validation).

Each mode runs in its own process and prints one JSON line (``{"result": ...}``) last::

    python -m mnemosyne.proxy.testing.gpu train    --socket S --steps N --out F [--fault-step K]
    python -m mnemosyne.proxy.testing.gpu plain    --steps N --out F
    python -m mnemosyne.proxy.testing.gpu fill     --socket S --bytes B
    python -m mnemosyne.proxy.testing.gpu attach   --socket S
    python -m mnemosyne.proxy.testing.gpu steptime --mode plain|proxy|proxy-alloc [--socket S]

``train --fault-step K`` commits step K-1, then launches a kernel that writes far outside a
valid buffer during step K's forward: the CUDA context gets a sticky illegal-address error
and the process dies with it, while the proxy (another process and context) keeps the state.
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
    """Write far past the end of a valid device buffer from a numba kernel (no bounds checks)."""
    from numba import cuda

    @cuda.jit  # type: ignore[untyped-decorator]
    def poke(arr: Any, index: Any) -> None:  # pragma: no cover - GPU
        arr[index] = 1.0

    buf = torch.zeros(16, device="cuda")
    poke[1, 1](cuda.as_cuda_array(buf), 1 << 40)
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
    if holder is not None:
        holder.flush()
    torch.save(_final(model, opt), args.out)
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
    torch.cuda.synchronize()
    holder.commit(0)
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
    for name, t in list(res.tensors.items())[:3] + list(res.tensors.items())[-2:]:
        want = float(name.removeprefix("model/t"))
        if not bool((t[:1024] == want).all()) or not bool((t[-1024:] == want).all()):
            msg = f"{name} does not hold its value after re-attach"
            raise SystemExit(msg)
    _say(result="attached", seconds=seconds, nbytes=nbytes, status=res.status.value,
         same_address=res.same_address, tensors=len(res.tensors))


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
    x, y = _batch(torch, 0, args.width, args.batch)
    for step in range(1, args.warmup + args.steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
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
    params = sum(p.numel() for p in model.parameters())
    _say(result="steptime", mode=args.mode, median_s=statistics.median(times), mean_s=statistics.fmean(times),
         params=params, steps=len(times))


def main(argv: list[str] | None = None) -> int:
    """Run one worker mode."""
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "plain", "fill", "attach", "steptime"])
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
    else:
        _attach(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
