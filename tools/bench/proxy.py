"""GPU validation and benchmark of the device proxy (cuda arena), one command on one GPU or more.

    python tools/bench/proxy.py            # from the repository root; --quick for a short run

Runs from the source tree (adds the core and proxy src folders to PYTHONPATH for itself and
every process it starts); needs torch with CUDA, cuda-python (cuda.bindings) and numba-cuda.
Cases, each in fresh processes with bounded waits:

0. checksum paths: the device checksum of the same random bytes with the numba-cuda kernel and
   with torch ops, each compared with the host definition (numba-cuda failing to import or
   compile is reported, not fatal: the proxies then use torch).
1. illegal address: a trainer keeps its state in a proxy, commits step 4, then a torch kernel
   writes to unmapped device memory (sticky illegal-address error) and the trainer dies; a new
   trainer re-attaches, finishes, and its final state must equal a fault-free run (and a
   run without any proxy) bit for bit.
2. attach time: a new process attaches to 1 GiB and to 20 GiB (or as much as fits) of state.
3. peer pull: a proxy fills its arena from a peer proxy on another GPU (the same GPU when only
   one exists; labelled so), verified by CUDA-kernel checksums; bandwidth as a fraction of a
   plain device-to-device copy between the same GPUs measured in this run.
4. step overhead: the same model and optimizer without a proxy and with its state adopted into
   the arena (begin_update/commit markers every step, written to the proxy's marker page);
   also with every allocation routed through the arena (the ctypes allocator). The trainer's
   time inside begin_update + commit per step is reported as the marker cost.

Prints versions first, then a table; writes everything as JSON under $OUT (or .bench/proxy),
including every worker's exit code and stderr tail (``workers``);
the last line is ``proxy_step_overhead: <ratio>``. Any failed case exits non-zero: no number is
printed that was not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SRC = [ROOT / "packages/mnemosyne-core/src", ROOT / "mnemosyne-proxy/src"]
for _p in reversed(SRC):
    sys.path.insert(0, str(_p))

GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "MNEMOSYNE_TOKEN": "bench-token", "MNEMOSYNE_JOB_ID": "bench"}
GIB = 1 << 30


class BenchError(RuntimeError):
    """A case failed; the message says which and why."""


def _env() -> dict[str, str]:
    env = {**os.environ, **GPU_ENV}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


#: Every worker run: its arguments, exit code, seconds and the tail of its stderr (into the JSON).
WORKERS: list[dict[str, Any]] = []


def _worker(args: list[str], timeout: float, expect_ok: bool = True) -> tuple[subprocess.CompletedProcess[str],
                                                                             list[dict[str, Any]]]:
    cmd = [sys.executable, "-m", "mnemosyne.proxy.testing.gpu", *args]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        WORKERS.append({"args": args, "rc": None, "seconds": timeout, "stderr_tail": err[-4000:]})
        raise BenchError(f"worker {args[0]} did not finish in {timeout} s; stderr: {err[-1500:]}") from exc
    WORKERS.append({"args": args, "rc": res.returncode, "seconds": time.perf_counter() - t0,
                    "stderr_tail": res.stderr[-4000:]})
    lines = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    if expect_ok and res.returncode != 0:
        raise BenchError(f"worker {' '.join(args)} exited {res.returncode}: {res.stderr[-3000:]}")
    return res, lines


def _result(lines: list[dict[str, Any]]) -> dict[str, Any]:
    found = [ln for ln in lines if "result" in ln]
    if not found:
        raise BenchError(f"worker printed no result: {lines}")
    return found[-1]


_STATE_ROOT: list[Path] = []


def _proxy(out: Path, name: str, device: int, size: int) -> Any:
    import tempfile

    from mnemosyne.proxy.testing.procs import ProxyProcess

    if not _STATE_ROOT:  # a short path: Unix socket paths are limited to ~100 bytes
        _STATE_ROOT.append(Path(tempfile.mkdtemp(prefix="mnpx")))
    return ProxyProcess(_STATE_ROOT[0] / name, size=str(size), job=GPU_ENV["MNEMOSYNE_JOB_ID"],
                        token=GPU_ENV["MNEMOSYNE_TOKEN"], arena="cuda", device=device, ready_timeout=120,
                        extra_env=_env())


def versions() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["driver"] = _driver_version()
    for mod in ("numba", "cuda.bindings"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = getattr(m, "__version__", "installed")
        except ImportError as exc:
            info[mod] = f"missing ({exc})"
    return info


def _driver_version() -> str:
    from mnemosyne.proxy.arena.cuda import driver

    err, ver = driver().cuDriverGetVersion()
    return f"{ver // 1000}.{(ver % 1000) // 10}" if int(err) == 0 else f"error {err}"


def case_checksum(out: Path, quick: bool) -> dict[str, Any]:
    _, lines = _worker(["checksum", "--bytes", str((64 if quick else 512) << 20)], 600)
    r = _result(lines)
    if not r["torch"].get("equal"):
        raise BenchError(f"the torch device checksum differs from the host definition (or failed): {r['torch']}")
    if "error" not in r["numba-cuda"] and not r["numba-cuda"].get("equal"):
        raise BenchError(f"the numba-cuda checksum differs from the host definition: {r['numba-cuda']}")
    return {k: v for k, v in r.items() if k != "result"}


def case_illegal_address(out: Path, quick: bool) -> dict[str, Any]:
    import torch

    steps = 8
    ref, plain, rec = out / "ia_ref.pt", out / "ia_plain.pt", out / "ia_recovered.pt"
    _worker(["plain", "--steps", str(steps), "--out", str(plain)], 600)
    with _proxy(out, "ia_ref", 0, GIB) as p:
        _worker(["train", "--socket", p.socket, "--steps", str(steps), "--out", str(ref)], 600)
    with _proxy(out, "ia", 0, GIB) as p:
        res, _lines = _worker(["train", "--socket", p.socket, "--steps", str(steps), "--out", str(rec),
                              "--fault-step", "5"], 600, expect_ok=False)
        if res.returncode == 0 or "illegal memory access" not in res.stderr:
            raise BenchError(f"the faulted trainer did not die of an illegal address (rc {res.returncode}): "
                             f"{res.stderr[-2000:]}")
        if p.proc.poll() is not None:
            raise BenchError(f"the proxy died with the trainer: {p.output()[-2000:]}")
        _res2, lines2 = _worker(["train", "--socket", p.socket, "--steps", str(steps), "--out", str(rec)], 600)
    attach = next(ln for ln in lines2 if ln.get("event") == "attach")
    if (attach["step"], attach["resumed"]) != (4, True):
        raise BenchError(f"re-attach found {attach}, expected committed step 4")
    a, b, c = (torch.load(f, weights_only=True) for f in (ref, rec, plain))
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    if differ or sorted(a) != sorted(b):
        raise BenchError(f"recovered state differs from the fault-free run: {differ[:5]}")
    # Also reported: whether keeping state in the arena changed numerics at all (no proxy run).
    same_as_plain = sorted(a) == sorted(c) and all(torch.equal(a[k], c[k]) for k in a)
    return {"fault": "illegal memory access (sticky) at step 5", "reattach_step": attach["step"],
            "same_address": attach["same_address"], "attach_s": attach["seconds"], "bitwise_equal": True,
            "equal_to_run_without_proxy": same_as_plain, "tensors": len(a)}


def case_attach(out: Path, nbytes: int, label: str) -> dict[str, Any]:
    with _proxy(out, f"attach_{label}", 0, nbytes + (256 << 20)) as p:
        _worker(["fill", "--socket", p.socket, "--bytes", str(nbytes)], 600)
        times = []
        res: dict[str, Any] = {}
        for _ in range(3):
            _, lines = _worker(["attach", "--socket", p.socket], 600)
            res = _result(lines)
            if res["status"] != "committed" or res["nbytes"] < nbytes * 0.99:
                raise BenchError(f"attach of {label}: {res}")
            times.append(res["seconds"])
    return {"state_bytes": res["nbytes"], "tensors": res["tensors"], "attach_s_median": statistics.median(times),
            "attach_s_all": times, "same_address": res["same_address"]}


def _d2d_baseline(src_dev: int, dst_dev: int, nbytes: int) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src_dev}")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_dev}")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(src_dev)
        torch.cuda.synchronize(dst_dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(src_dev)
        torch.cuda.synchronize(dst_dev)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / best


def case_pull(out: Path, nbytes: int) -> dict[str, Any]:
    import torch

    from mnemosyne.proxy.client import ProxyClient

    two = torch.cuda.device_count() >= 2
    dst_dev = 1 if two else 0
    label = "GPU0 -> GPU1" if two else "GPU0 -> GPU0 (one GPU: two proxies on the same device)"
    with _proxy(out, "pull_src", 0, nbytes + (256 << 20)) as src, _proxy(out, "pull_dst", dst_dev,
                                                                         nbytes + (256 << 20)) as dst:
        _worker(["fill", "--socket", src.socket, "--bytes", str(nbytes)], 600)
        with ProxyClient(dst.socket, token=GPU_ENV["MNEMOSYNE_TOKEN"], job=GPU_ENV["MNEMOSYNE_JOB_ID"],
                         role="admin") as c, c.call_with_timeout(900):
            first = c.pull(src.unix_address, "")
            again = c.pull(src.unix_address, "")  # warm: CUDA kernels compiled, memory touched
            st = c.status()
    if st.status != 1 or again.step != 0:
        raise BenchError(f"pull left status {st}")
    baseline = _d2d_baseline(0, dst_dev, nbytes)
    bw_copy = again.nbytes / again.copy_seconds
    bw_total = again.nbytes / again.seconds
    return {"pair": label, "bytes": again.nbytes, "copy_s": again.copy_seconds, "total_s": again.seconds,
            "first_total_s": first.seconds, "pull_copy_GBps": bw_copy / 1e9, "pull_verified_GBps": bw_total / 1e9,
            "plain_d2d_GBps": baseline / 1e9, "copy_fraction_of_d2d": bw_copy / baseline,
            "verified_fraction_of_d2d": bw_total / baseline, "path": again.path,
            "checksum_path": again.path.partition("checksums: ")[2]}


def case_step_overhead(out: Path, quick: bool) -> dict[str, Any]:
    steps = ["--steps", "30" if quick else "100", "--warmup", "10" if quick else "20"]
    results: dict[str, list[float]] = {"plain": [], "proxy": [], "proxy-alloc": []}
    marker: dict[str, list[float]] = {"proxy": [], "proxy-alloc": []}
    params = 0
    rounds = 1 if quick else 2
    with _proxy(out, "steptime", 0, 16 * GIB) as p:
        for _ in range(rounds):  # alternate the modes so drift hits them alike
            for mode in ("plain", "proxy", "proxy-alloc"):
                sock = [] if mode == "plain" else ["--socket", p.socket]
                _, lines = _worker(["steptime", *steps, *sock, "--mode", mode], 600)
                r = _result(lines)
                results[mode].append(r["median_s"])
                if mode in marker:
                    marker[mode].append(r["marker_median_s"])
                params = r["params"]
    med = {m: statistics.fmean(v) for m, v in results.items()}
    mark = {m: statistics.fmean(v) for m, v in marker.items()}
    return {"params": params, "step_s": med, "overhead_adopt": med["proxy"] / med["plain"],
            "overhead_alloc": med["proxy-alloc"] / med["plain"], "marker_s_per_step": mark,
            "marker_fraction_of_step": mark["proxy"] / med["plain"], "raw": results, "raw_marker": marker}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps")
    ap.add_argument("--big-gib", type=float, default=20.0, help="size of the large attach case (default 20)")
    ap.add_argument("--only", default="", help="comma-separated case names to run (default: all)")
    args = ap.parse_args()
    os.environ.update(GPU_ENV)
    info = versions()
    print("versions: " + json.dumps(info), flush=True)
    import torch

    if not torch.cuda.is_available():
        print("proxy bench: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT") or ROOT / ".bench/proxy")
    out.mkdir(parents=True, exist_ok=True)
    free, _total = torch.cuda.mem_get_info(0)
    big = int(min(args.big_gib * GIB, (free - 8 * GIB) * 0.9)) // (256 << 20) * (256 << 20)
    report: dict[str, Any] = {"versions": info}
    failures: list[str] = []
    cases = [
        ("checksum_paths", lambda: case_checksum(out, args.quick)),
        ("illegal_address", lambda: case_illegal_address(out, args.quick)),
        ("attach_1GiB", lambda: case_attach(out, GIB, "1GiB")),
        ("attach_big", lambda: case_attach(out, (2 * GIB) if args.quick else big, "big")),
        ("peer_pull", lambda: case_pull(out, GIB if args.quick else 4 * GIB)),
        ("step_overhead", lambda: case_step_overhead(out, args.quick)),
    ]
    only = {c for c in args.only.split(",") if c}
    unknown = only - {name for name, _ in cases}
    if unknown:
        ap.error(f"--only: unknown case(s) {sorted(unknown)}; expected some of {[name for name, _ in cases]}")
    for name, fn in cases:
        if only and name not in only:
            report[name] = {"error": "not run (--only)"}
            continue
        t0 = time.perf_counter()
        try:
            report[name] = fn()
            report[name]["case_s"] = time.perf_counter() - t0
            print(f"[ok] {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as exc:
            failures.append(f"{name}: {exc}")
            report[name] = {"error": str(exc)}
            print(f"[FAILED] {name}: {exc}", flush=True)
    report["workers"] = WORKERS
    (out / "proxy_bench.json").write_text(json.dumps(report, indent=2, default=str))
    if _STATE_ROOT:  # keep the proxies' own logs with the results, drop their sockets and arenas' logs
        import shutil

        for f in _STATE_ROOT[0].glob("*.proxy.out"):
            shutil.copy(f, out / f.name)
        shutil.rmtree(_STATE_ROOT[0], ignore_errors=True)
    print()
    print(f"{'case':<22} {'result'}")
    r = report["checksum_paths"]
    if "error" not in r:
        nc = r["numba-cuda"]
        nc_text = (f"equal {nc['equal']} ({nc['seconds'] * 1e3:.1f} ms)" if "error" not in nc
                   else f"UNAVAILABLE ({nc['error'][:160]})")
        print(f"{'checksum paths':<22} {r['nbytes'] / (1 << 20):.0f} MiB on the GPU vs host ({r['host_path']}): "
              f"torch equal {r['torch']['equal']} ({r['torch']['seconds'] * 1e3:.1f} ms), numba-cuda {nc_text}")
    if "error" not in report["illegal_address"]:
        r = report["illegal_address"]
        print(f"{'illegal address':<22} re-attached at step {r['reattach_step']} in {r['attach_s'] * 1e3:.2f} ms, "
              f"same address {r['same_address']}, bitwise equal to fault-free {r['bitwise_equal']} "
              f"(and to a run without proxy: {r['equal_to_run_without_proxy']})")
    for key in ("attach_1GiB", "attach_big"):
        r = report[key]
        if "error" not in r:
            print(f"{'attach ' + key[7:]:<22} {r['state_bytes'] / GIB:.1f} GiB, {r['tensors']} tensors: "
                  f"{r['attach_s_median'] * 1e3:.2f} ms (median of 3), same address {r['same_address']}")
    r = report["peer_pull"]
    if "error" not in r:
        print(f"{'peer pull':<22} {r['pair']}: {r['bytes'] / GIB:.1f} GiB copy {r['pull_copy_GBps']:.1f} GB/s = "
              f"{r['copy_fraction_of_d2d']:.2f} of plain d2d ({r['plain_d2d_GBps']:.1f} GB/s); with checksum "
              f"verification {r['pull_verified_GBps']:.1f} GB/s = {r['verified_fraction_of_d2d']:.2f}; {r['path']}")
        print(f"{'pull checksum path':<22} {r['checksum_path']}")
    r = report["step_overhead"]
    if "error" not in r:
        s = r["step_s"]
        print(f"{'step time':<22} {r['params'] / 1e6:.0f}M params: plain {s['plain'] * 1e3:.2f} ms, adopted "
              f"{s['proxy'] * 1e3:.2f} ms (x{r['overhead_adopt']:.4f}), all allocations in arena "
              f"{s['proxy-alloc'] * 1e3:.2f} ms (x{r['overhead_alloc']:.4f})")
        mk = r["marker_s_per_step"]
        print(f"{'step markers':<22} begin_update + commit per step: adopted {mk['proxy'] * 1e6:.1f} us, "
              f"arena allocator {mk['proxy-alloc'] * 1e6:.1f} us ({r['marker_fraction_of_step'] * 100:.3f}% of a step)")
    print(f"full results: {out / 'proxy_bench.json'}")
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    if "overhead_adopt" in report["step_overhead"]:
        print(f"proxy_step_overhead: {report['step_overhead']['overhead_adopt']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
