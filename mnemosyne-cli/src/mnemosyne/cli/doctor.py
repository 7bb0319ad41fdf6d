"""``mnemo doctor``: what this machine can run, as a table or as JSON.

Every probe is real (imports the package, asks the driver, loads the NCCL library) and
none of them is fatal: a missing or broken component is reported as such.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib
import json
import os
import platform
import sys
from typing import Any

from mnemosyne.cli.main import installed_components
from mnemosyne.core.env import MNEMOSYNE_DOCTOR_PROBE_NCCL

__all__ = ["NCCL_GROW_MIN", "NCCL_SHRINK_MIN", "collect", "nccl_capabilities", "register"]

#: First NCCL releases with ncclCommShrink (with the abort flag) and ncclCommGrow.
NCCL_SHRINK_MIN = (2, 27, 3)
NCCL_GROW_MIN = (2, 29, 2)


def nccl_capabilities(ver: tuple[int, int, int]) -> dict[str, bool]:
    """Which flexible operations an NCCL version supports natively."""
    return {"shrink": ver >= NCCL_SHRINK_MIN, "grow": ver >= NCCL_GROW_MIN}


def _decode_nccl_code(code: int) -> tuple[int, int, int]:
    # NCCL encodes versions as X*1000+Y*100+Z before 2.9 and X*10000+Y*100+Z after.
    if code >= 20900:
        return code // 10000, (code % 10000) // 100, code % 100
    return code // 1000, (code % 1000) // 100, code % 100


def _module_version(name: str) -> dict[str, Any]:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # any import failure is a finding, not a crash
        return {"installed": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
    ver = getattr(mod, "__version__", None)
    if ver is None:
        from importlib.metadata import PackageNotFoundError, version

        dist = {"nccl": "nccl4py", "cuda": "cuda-python", "zmq": "pyzmq"}.get(name.split(".")[0], name)
        try:
            ver = version(dist)
        except PackageNotFoundError:
            ver = None
    return {"installed": True, "version": None if ver is None else str(ver)}


def _libnccl() -> dict[str, Any] | None:
    """Load libnccl the way the dynamic linker would and ask it its version."""
    candidates = ["libnccl.so.2"]
    found = ctypes.util.find_library("nccl")
    if found:
        candidates.append(found)
    try:  # the nvidia-nccl-cu* wheels put the library under nvidia/nccl/lib
        import nvidia.nccl  # type: ignore[import-not-found]

        for base in nvidia.nccl.__path__:
            candidates.insert(0, os.path.join(base, "lib", "libnccl.so.2"))
    except ImportError:
        pass
    for cand in candidates:
        try:
            lib = ctypes.CDLL(cand)
        except OSError:
            continue
        code = ctypes.c_int(0)
        if lib.ncclGetVersion(ctypes.byref(code)) != 0:
            continue
        ver = _decode_nccl_code(code.value)
        return {"path": cand, "version": ".".join(map(str, ver)), **nccl_capabilities(ver)}
    return None


def _torch_report() -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]:
    try:
        import torch
        import torch.distributed as dist
    except Exception as exc:
        return {"installed": False, "error": f"{type(exc).__name__}: {exc}"[:200]}, None, []
    cuda_ok = torch.cuda.is_available()
    info: dict[str, Any] = {
        "installed": True,
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": cuda_ok,
        "distributed": dist.is_available(),
        "gloo": dist.is_available() and dist.is_gloo_available(),
        "nccl_backend": dist.is_available() and dist.is_nccl_available(),
    }
    gpus: list[dict[str, Any]] = []
    nccl: dict[str, Any] | None = None
    if cuda_ok:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"})
        try:
            raw = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]
            ver = raw if isinstance(raw, tuple) else _decode_nccl_code(int(raw))
            ver = (int(ver[0]), int(ver[1]), int(ver[2]))
            nccl = {"torch_nccl": ".".join(map(str, ver)), **nccl_capabilities(ver)}
        except Exception as exc:
            nccl = {"torch_nccl": None, "error": str(exc)[:200]}
    return info, nccl, gpus


def _vmm_report(device_count: int) -> dict[str, Any] | None:
    """CUDA VMM and POSIX-fd export support through cuda-python, per device."""
    if device_count == 0:
        return None
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]
    except ImportError:
        try:
            from cuda import cuda as driver  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return {"checked": False, "why": "cuda-python not installed: pip install 'mnemosyne-proxy[cuda]'"}
    (err,) = driver.cuInit(0)
    if int(err) != 0:
        return {"checked": False, "why": f"cuInit failed: {err}"}
    out: dict[str, Any] = {"checked": True, "devices": []}
    attr = driver.CUdevice_attribute
    for i in range(device_count):
        err, dev = driver.cuDeviceGet(i)
        _, vmm = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev)
        _, fd = driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev
        )
        out["devices"].append({"index": i, "vmm": bool(vmm), "posix_fd": bool(fd)})
    return out


def collect() -> dict[str, Any]:
    """Gather the full environment report (the ``--json`` document)."""
    torch_info, nccl, gpus = _torch_report()
    lib = _libnccl() if gpus or os.environ.get(MNEMOSYNE_DOCTOR_PROBE_NCCL) else None
    if nccl is not None or lib is not None:
        nccl = dict(nccl or {})
        nccl["library"] = lib
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "components": installed_components(),
        "torch": torch_info,
        "gpus": gpus,
        "nccl": nccl,
        "packages": {
            "nccl4py": _module_version("nccl.core") if gpus else _module_version("nccl"),
            "cuda-python": _module_version("cuda.bindings"),
            "numba": _module_version("numba"),
            "pyzmq": _module_version("zmq"),
            "numpy": _module_version("numpy"),
        },
        "cuda_vmm": _vmm_report(len(gpus)),
    }


def _render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="mnemo doctor", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("status")
    py = report["python"]
    table.add_row("python", f"{py['version']} ({py['executable']})")
    for dist, ver in report["components"].items():
        table.add_row(dist, ver or "[dim]not installed[/dim]")
    t = report["torch"] or {}
    if t.get("installed"):
        table.add_row("torch", f"{t['version']} (cuda build: {t['cuda_build'] or 'none, CPU'}; "
                      f"gloo: {t['gloo']}, nccl: {t['nccl_backend']})")
    else:
        table.add_row("torch", f"[yellow]not importable[/yellow] {t.get('error', '')}")
    table.add_row("gpus", ", ".join(f"{g['index']}: {g['name']} {g['memory_gib']} GiB" for g in report["gpus"])
                  or "none (CPU training with Gloo)")
    nccl = report["nccl"]
    if nccl is None:
        table.add_row("nccl", "n/a (no GPU)")
    else:
        lib = nccl.get("library") or {}
        table.add_row("nccl", f"torch's: {nccl.get('torch_nccl')}; library: {lib.get('version')} ({lib.get('path')}); "
                      f"shrink: {lib.get('shrink', nccl.get('shrink'))}, grow: {lib.get('grow', nccl.get('grow'))}")
    for name, info in report["packages"].items():
        table.add_row(name, info.get("version") or "installed" if info["installed"] else "[dim]not installed[/dim]")
    vmm = report["cuda_vmm"]
    table.add_row("cuda vmm", "n/a (no GPU)" if vmm is None else json.dumps(vmm))
    console.print(table)


def _run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _render(report)
    return 0


def register(sub: Any) -> None:
    """Add ``mnemo doctor`` to the ``mnemo`` parser (entry point of mnemosyne.cli.commands)."""
    p = sub.add_parser("doctor", help="report Python, torch, GPUs, NCCL version and capabilities, optional packages")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run)
