"""Pipeline stages' cores: the ones local to each stage's GPU, shared evenly on a node."""
from __future__ import annotations

import pytest

from offload_engine.pipeline.affinity import (compact_cpulist, local_cpus, online_cpus, parse_cpulist, physical_core,
                                               stage_cores)


@pytest.mark.parametrize("text,cores", [("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}), ("5", {5}), ("", set()),
                                        ("0-63", set(range(64)))])
def test_cpulist_round_trip(text, cores):
    assert parse_cpulist(text) == cores
    if cores:
        assert parse_cpulist(compact_cpulist(cores)) == cores
    assert compact_cpulist({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"


def test_local_cpus_read_from_sysfs(tmp_path):
    entry = tmp_path / "0000:1b:00.0"
    entry.mkdir()
    (entry / "local_cpulist").write_text("0-15,64-79\n")
    assert local_cpus("0000:1b:00.0", tmp_path) == set(range(16)) | set(range(64, 80))
    assert local_cpus("0000:99:00.0", tmp_path) is None  # no entry: not known


def test_two_sockets_two_gpus_each():
    node0, node1 = set(range(16)), set(range(16, 32))
    local = [node0, node0, node1, node1]
    got = [stage_cores(r, node0 | node1, local) for r in range(4)]
    assert got == [set(range(0, 8)), set(range(8, 16)), set(range(16, 24)), set(range(24, 32))]


def test_only_the_allowed_cores_are_used():
    allowed = set(range(0, 8)) | {16, 17, 18, 19}
    local = [set(range(16)), set(range(16)), set(range(16, 32)), set(range(16, 32))]
    got = [stage_cores(r, allowed, local) for r in range(4)]
    assert got == [{0, 1, 2, 3}, {4, 5, 6, 7}, {16, 17}, {18, 19}]
    assert all(g <= allowed for g in got) and not set.intersection(*got)


def test_unknown_or_unreachable_locality_falls_back_to_all_allowed_cores():
    allowed = set(range(8))
    assert [stage_cores(r, allowed, [None, None]) for r in range(2)] == [set(range(4)), set(range(4, 8))]
    outside = [set(range(32, 40))] * 2  # its local cores are not ours to use
    assert [stage_cores(r, allowed, outside) for r in range(2)] == [set(range(4)), set(range(4, 8))]
    assert stage_cores(2, {0, 1}, [None, None, None]) == {0, 1}  # fewer cores than stages: shared


def test_hyperthread_siblings_stay_in_one_share(tmp_path):
    cores = set(range(4)) | set(range(64, 68))
    for c in cores:  # core c and c + 64 are one physical core
        (tmp_path / f"cpu{c}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{c}" / "topology" / "thread_siblings_list").write_text(f"{c % 64},{c % 64 + 64}\n")
    physical = physical_core(cores, tmp_path)
    assert physical[65] == 1 and physical[1] == 1
    got = [stage_cores(r, cores, [cores, cores], physical=physical) for r in range(2)]
    assert got == [{0, 64, 1, 65}, {2, 66, 3, 67}]


def test_a_confined_process_keeps_its_cores():
    """A launcher (or numactl) that bound each rank already decided: nothing is split further."""
    online, mine = set(range(32)), set(range(8))
    local = [set(range(16)), set(range(16)), set(range(16, 32)), set(range(16, 32))]
    assert stage_cores(0, mine, local, online) == mine
    assert stage_cores(0, online, local, online) == set(range(8))


def test_stages_on_another_node_are_not_peers():
    allowed = set(range(32))
    local = [set(range(16)), set(range(16, 32)), set(range(16, 32))]
    assert stage_cores(0, allowed, local) == set(range(16))  # alone on its node
    assert [stage_cores(r, allowed, local) for r in (1, 2)] == [set(range(16, 24)), set(range(24, 32))]


def test_online_cpus_from_sysfs(tmp_path):
    (tmp_path / "online").write_text("0-7\n")
    assert online_cpus(tmp_path) == set(range(8))
