"""CPU placement: read the topology from /sys, pick one socket's physical cores, pin to them.

Decode at batch size 1 is memory-bound; threads that hop sockets or share a core with their SMT sibling
only add traffic. So: one compute thread per physical core of one socket, the process's affinity set
to those cores, memory preferred from that socket's NUMA node, all before torch builds its thread pool.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class Cpu:
    id: int
    socket: int
    core: int
    node: int


@dataclass(frozen=True)
class Placement:
    socket: int
    cpus: tuple[int, ...]  # one logical CPU per physical core
    node: int
    threads: int

    def describe(self) -> str:
        return f"socket {self.socket}, cores {_ranges(self.cpus)}, {self.threads} threads, NUMA node {self.node}"


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]"""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def _ranges(cpus: tuple[int, ...]) -> str:
    out, start, prev = [], None, None
    for c in sorted(cpus):
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = c
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(out)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_topology(sys_root: Path = Path("/sys")) -> list[Cpu]:
    """Online CPUs with socket, core and NUMA node. Missing files fall back to: socket 0, each CPU its
    own core, node 0."""
    cpu_dir = sys_root / "devices/system/cpu"
    online = _read(cpu_dir / "online")
    ids = (
        parse_cpu_list(online)
        if online
        else sorted(int(p.name[3:]) for p in cpu_dir.glob("cpu[0-9]*") if p.name[3:].isdigit())
    )
    if not ids:
        ids = list(range(os.cpu_count() or 1))
    node_of: dict[int, int] = {}
    for node_dir in (sys_root / "devices/system/node").glob("node[0-9]*"):
        cpulist = _read(node_dir / "cpulist")
        for c in parse_cpu_list(cpulist) if cpulist else []:
            node_of[c] = int(node_dir.name[4:])
    cpus = []
    for c in ids:
        topo = cpu_dir / f"cpu{c}" / "topology"
        socket = _read(topo / "physical_package_id")
        core = _read(topo / "core_id")
        cpus.append(
            Cpu(
                c,
                int(socket) if socket and socket.lstrip("-").isdigit() and int(socket) >= 0 else 0,
                int(core) if core and core.isdigit() else c,
                node_of.get(c, 0),
            )
        )
    return cpus


def choose(cpus: list[Cpu], socket: int, allowed: set[int] | None = None, threads: int | None = None) -> Placement:
    """The first logical CPU of each physical core of ``socket`` that the process may run on."""
    usable = [c for c in cpus if allowed is None or c.id in allowed]
    sockets = sorted({c.socket for c in usable})
    if socket not in sockets:
        raise ValueError(f"socket {socket} not available; this machine offers sockets {sockets}")
    first_per_core: dict[int, Cpu] = {}
    for c in sorted(usable, key=lambda c: c.id):
        if c.socket == socket:
            first_per_core.setdefault(c.core, c)
    chosen = tuple(sorted(c.id for c in first_per_core.values()))
    nodes = [c.node for c in first_per_core.values()]
    node = max(set(nodes), key=nodes.count)
    return Placement(socket, chosen, node, min(threads or len(chosen), len(chosen)))


ISA_FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_isa(cpuinfo: Path | None = None) -> str:
    """What the INT8 kernels can use, e.g. 'AVX512 + avx512_vnni avx512_bf16 amx_int8 amx_bf16'."""
    import torch

    from quant.kernels import cpu_flags

    capability = torch.backends.cpu.get_cpu_capability()
    found = [f for f in ISA_FLAGS if f in cpu_flags(cpuinfo)]
    return f"{capability} + {' '.join(found)}" if found else capability


def _prefer_node(node: int) -> None:
    """set_mempolicy(MPOL_PREFERRED, node): allocate on the socket's memory, fall back elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mask = ctypes.c_ulong(1 << node)
        if libc.syscall(238, 1, ctypes.byref(mask), ctypes.c_ulong(64)) != 0:  # x86-64 set_mempolicy
            log.debug("set_mempolicy failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):
        pass


def apply(placement: Placement) -> None:
    """Pin this process and set thread counts; call before torch starts its thread pool."""
    for var in THREAD_ENV:
        os.environ[var] = str(placement.threads)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, placement.cpus)
    _prefer_node(placement.node)
    import torch

    torch.set_num_threads(placement.threads)


def place(socket: int = 0, threads: int | None = None, sys_root: Path = Path("/sys")) -> Placement:
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    placement = choose(read_topology(sys_root), socket, allowed, threads)
    apply(placement)
    return placement
