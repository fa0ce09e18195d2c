"""CPU placement from fake /sys trees."""

import os
from pathlib import Path

import pytest

from server.runtime.placement import choose, parse_cpu_list, read_topology


def fake_sys(root: Path, cpus: dict[int, tuple[int, int]], nodes: dict[int, str] | None = None, online=True) -> Path:
    """cpus: {cpu: (socket, core)}; nodes: {node: cpulist}."""
    cpu_dir = root / "devices/system/cpu"
    for cpu, (socket, core) in cpus.items():
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{socket}\n")
        (topo / "core_id").write_text(f"{core}\n")
    if online:
        (cpu_dir / "online").write_text(f"0-{max(cpus)}\n")
    for node, cpulist in (nodes or {}).items():
        (root / f"devices/system/node/node{node}").mkdir(parents=True)
        (root / f"devices/system/node/node{node}/cpulist").write_text(cpulist + "\n")
    return root


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]


def test_two_sockets_with_smt_pick_one_thread_per_physical_core(tmp_path):
    # 2 sockets x 4 cores x 2 threads; Linux numbering: siblings are cpu n and n+8
    cpus = {c: (c % 8 // 4, c % 4) for c in range(16)}
    root = fake_sys(tmp_path, cpus, {0: "0-3,8-11", 1: "4-7,12-15"})
    topology = read_topology(root)
    first = choose(topology, socket=0)
    assert first.cpus == (0, 1, 2, 3) and first.node == 0 and first.threads == 4
    second = choose(topology, socket=1)
    assert second.cpus == (4, 5, 6, 7) and second.node == 1
    assert choose(topology, socket=1, threads=2).threads == 2
    with pytest.raises(ValueError, match="socket 2"):
        choose(topology, socket=2)


def test_one_socket_without_smt_uses_every_core(tmp_path):
    root = fake_sys(tmp_path, {0: (0, 0), 1: (0, 1)}, {0: "0-1"})
    placement = choose(read_topology(root), socket=0)
    assert placement.cpus == (0, 1) and placement.threads == 2


def test_missing_numa_and_online_files_fall_back(tmp_path):
    root = fake_sys(tmp_path, {0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1)}, nodes=None, online=False)
    placement = choose(read_topology(root), socket=0)
    assert placement.cpus == (0, 2) and placement.node == 0


def test_affinity_mask_restricts_the_choice(tmp_path):
    root = fake_sys(tmp_path, {c: (0, c) for c in range(4)}, {0: "0-3"})
    assert choose(read_topology(root), socket=0, allowed={2, 3}).cpus == (2, 3)


def test_this_machine_gets_one_cpu_of_each_physical_core_of_socket_0_it_may_run_on():
    cpus = read_topology()
    allowed = os.sched_getaffinity(0)
    placement = choose(cpus, socket=0, allowed=allowed)
    mine = [c for c in cpus if c.socket == 0 and c.id in allowed]
    chosen = [c for c in cpus if c.id in placement.cpus]
    assert set(placement.cpus) <= allowed and all(c.socket == 0 for c in chosen)
    assert sorted({c.core for c in chosen}) == sorted({c.core for c in mine})  # every core, once
    assert len(chosen) == len({c.core for c in chosen}) == placement.threads
    assert placement.node in {c.node for c in chosen}


def test_isa_names_the_int8_extensions(tmp_path):
    from server.runtime.placement import cpu_isa

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_vnni amx_int8 amx_tile\n")
    isa = cpu_isa(cpuinfo)
    assert isa.endswith("+ avx512_vnni amx_int8")
    cpuinfo.write_text("processor : 0\nflags : fpu avx2\n")
    assert "+" not in cpu_isa(cpuinfo)
