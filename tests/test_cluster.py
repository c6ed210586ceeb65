"""`launcher.cluster`: the ring formulas, which link a group uses, the built-in specs and strict spec files."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from stratagem.errors import ConfigError
from stratagem.launcher.cluster import KINDS, ClusterSpec, Link, builtin_cluster, load_cluster, ring_terms

# Round figures so that every expected time below is worked out by hand.
INTRA = Link(bandwidth=100.0, latency=1.0)
INTER = Link(bandwidth=10.0, latency=5.0)


def two_nodes_of_four() -> ClusterSpec:
    return ClusterSpec(name="toy", nodes=2, devices_per_node=4, device_flops=1e12, device_memory=10**9,
                       intra_node=INTRA, inter_node=INTER)


# 1. formulas


@pytest.mark.parametrize("kind, seconds", [
    ("all_reduce", 2 * 3 / 4 * 800 / 100 + 2 * 3 * 1.0),  # 12 + 6
    ("all_gather", 3 / 4 * 800 / 100 + 3 * 1.0),  # 6 + 3
    ("reduce_scatter", 3 / 4 * 800 / 100 + 3 * 1.0),
    ("all_to_all", 3 / 4 * 800 / 100 + 3 * 1.0),
    ("send_recv", 800 / 100 + 1.0),  # 8 + 1
])
def test_ring_formulas_within_a_node(kind, seconds):
    assert two_nodes_of_four().collective_seconds(kind, 800, group_size=4) == pytest.approx(seconds, rel=1e-12)


def test_ring_formulas_across_nodes():
    spec = two_nodes_of_four()
    assert spec.collective_seconds("all_reduce", 800, group_size=8) == pytest.approx(2 * 7 / 8 * 800 / 10 + 14 * 5.0)
    assert spec.collective_seconds("all_gather", 800, group_size=2, stride=4) == pytest.approx(1 / 2 * 800 / 10 + 5.0)
    assert spec.collective_seconds("send_recv", 800, group_size=2, stride=4) == pytest.approx(800 / 10 + 5.0)


@pytest.mark.parametrize("kind", KINDS)
def test_one_rank_costs_nothing(kind):
    assert two_nodes_of_four().collective_seconds(kind, 10**9, group_size=1) == 0.0
    assert ring_terms(kind, 1) == (0.0, 0)


def test_unknown_collective_is_refused():
    with pytest.raises(ValueError, match="unknown collective 'broadcast'"):
        two_nodes_of_four().collective_seconds("broadcast", 800, group_size=4)
    with pytest.raises(ValueError, match="unknown collective"):
        two_nodes_of_four().collective_seconds("broadcast", 800, group_size=1)


# 2. which link


@pytest.mark.parametrize("group_size, stride, link", [
    (4, 1, INTRA),  # ranks 0-3: one node
    (2, 1, INTRA),
    (2, 2, INTRA),  # 0, 2 and 1, 3: within a node
    (8, 1, INTER),  # the whole world
    (4, 2, INTER),  # 0, 2, 4, 6: both nodes
    (2, 4, INTER),  # 0, 4: one rank on each node
    (3, 1, INTER),  # blocks of 3 straddle the nodes (3-5)
])
def test_link_by_group_size_and_stride(group_size, stride, link):
    assert two_nodes_of_four().link(group_size, stride) == link


def test_one_node_always_uses_its_intra_node_link():
    spec = ClusterSpec(name="one", nodes=1, devices_per_node=6, device_flops=1e12, device_memory=10**9,
                       intra_node=INTRA, inter_node=INTER)
    assert spec.link(3, 1) == spec.link(6, 1) == INTRA


def test_a_group_larger_than_the_world_is_a_bug():
    with pytest.raises(ValueError, match="spans 16 ranks"):
        two_nodes_of_four().link(8, 2)


# 3. built-in specs


def test_builtin_h100_figures():
    spec = builtin_cluster("h100-sxm", nodes=4)
    assert (spec.nodes, spec.devices_per_node, spec.world) == (4, 8, 32)
    assert spec.device_flops == 989e12  # dense bf16
    assert spec.device_memory == 80 * 10**9
    assert spec.intra_node.bandwidth == 450e9  # NVLink 4, per direction
    assert spec.inter_node.bandwidth == 50e9  # 400 Gb/s InfiniBand per GPU
    assert spec.compute_efficiency == 0.5
    # A 1 GB gradient all-reduce over one node: 2 * 7/8 * 1e9 / 450e9 s + 14 steps of 5.7 us.
    assert spec.collective_seconds("all_reduce", 1e9, 8) == pytest.approx(1.75 / 450 + 14 * 5.7e-6)


def test_builtin_a100_figures():
    spec = builtin_cluster("a100-80g")
    assert (spec.nodes, spec.devices_per_node) == (1, 8)
    assert spec.device_flops == 312e12
    assert spec.device_memory == 80 * 10**9
    assert spec.intra_node.bandwidth == 240e9  # NVLink 3 as nccl-tests measures it
    assert spec.inter_node.bandwidth == 25e9  # 200 Gb/s HDR per GPU
    assert spec.intra_node.bandwidth < builtin_cluster("h100-sxm").intra_node.bandwidth


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown cluster 'h200'; built-in clusters: a100-80g, h100-sxm"):
        builtin_cluster("h200")


def test_importing_the_cluster_module_does_not_import_torch():
    code = "import sys, stratagem.launcher.cluster; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# 4. spec files

SPEC_TOML = """
name = "lab"
nodes = 2
devices_per_node = 4
device_flops = 1e12
device_memory = 16e9
compute_efficiency = 0.4
[intra_node]
bandwidth = 100.0
latency = 1.0
[inter_node]
bandwidth = 10.0
latency = 5
"""

LAB = ClusterSpec(name="lab", nodes=2, devices_per_node=4, device_flops=1e12, device_memory=16 * 10**9,
                  intra_node=INTRA, inter_node=INTER, compute_efficiency=0.4)


def test_toml_spec(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(SPEC_TOML)
    spec = load_cluster(path)
    assert spec == LAB
    assert isinstance(spec.device_memory, int)
    assert load_cluster(str(path), nodes=8).world == 32


def test_json_spec_with_default_name_and_efficiency(tmp_path):
    path = tmp_path / "rack.json"
    table = {"nodes": 2, "devices_per_node": 4, "device_flops": 1e12, "device_memory": 16 * 10**9,
             "intra_node": {"bandwidth": 100, "latency": 1}, "inter_node": {"bandwidth": 10, "latency": 5}}
    path.write_text(json.dumps(table))
    spec = load_cluster(path)
    assert spec.name == "rack"
    assert spec.compute_efficiency == 0.5
    assert spec.inter_node == INTER


def test_spec_from_a_base_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "slow-ib.toml"
    path.write_text('base = "h100-sxm"\nnodes = 16\n[inter_node]\nbandwidth = 25e9\n')
    spec = load_cluster(path)
    h100 = builtin_cluster("h100-sxm")
    assert spec.name == "slow-ib"
    assert spec.nodes == 16
    assert spec.inter_node == Link(bandwidth=25e9, latency=h100.inter_node.latency)
    assert (spec.device_flops, spec.intra_node) == (h100.device_flops, h100.intra_node)


def test_builtin_by_name_through_load_cluster():
    assert load_cluster("a100-80g", nodes=2) == builtin_cluster("a100-80g", nodes=2)
    assert load_cluster("h100-sxm").nodes == 1


BAD_SPECS = [
    # (what is written in the file, what the message must say after "<file>: ")
    (SPEC_TOML.replace("device_flops", "device_flop"), "unknown key device_flop (did you mean device_flops?)"),
    (SPEC_TOML.replace("bandwidth = 100.0", "bandwith = 100.0"),
     "unknown key intra_node.bandwith (did you mean intra_node.bandwidth?)"),
    (SPEC_TOML.replace("device_flops = 1e12", 'device_flops = "fast"'), "device_flops = 'fast': expected a number"),
    (SPEC_TOML.replace("nodes = 2", "nodes = 1.5"), "nodes = 1.5: expected an integer"),
    (SPEC_TOML.replace("devices_per_node = 4", "devices_per_node = true"),
     "devices_per_node = True: expected a number"),
    (SPEC_TOML.replace("nodes = 2", "nodes = 0"), "nodes = 0: must be at least 1"),
    (SPEC_TOML.replace("device_memory = 16e9", "device_memory = -1"), "device_memory = -1: must be positive"),
    (SPEC_TOML.replace("compute_efficiency = 0.4", "compute_efficiency = 1.5"),
     "compute_efficiency = 1.5: must be in (0, 1]"),
    (SPEC_TOML.replace("bandwidth = 100.0", "bandwidth = -100.0"), "intra_node.bandwidth = -100.0: must be positive"),
    (SPEC_TOML.replace("latency = 5", "latency = -5"), "inter_node.latency = -5.0: must not be negative"),
    (SPEC_TOML.replace("latency = 5", 'latency = "5us"'), "inter_node.latency = '5us': expected a number"),
    (SPEC_TOML.replace('name = "lab"', "name = 3"), "name = 3: expected a string"),
    (SPEC_TOML.replace("device_memory = 16e9\n", ""), "missing key 'device_memory'"),
    (SPEC_TOML.replace("latency = 5\n", ""), "missing key inter_node.latency"),
    ('base = "h200"\n', "base = 'h200': not a built-in cluster (built-in: a100-80g, h100-sxm)"),
    ('base = "h100-sxm"\nintra_node = 5\n', "intra_node = 5: expected a table with bandwidth and latency"),
    ("nodes = = 2\n", "invalid TOML: "),
]


def assert_refused(path, text: str, message: str) -> None:
    """Loading a spec file holding `text` fails with one line: the file, then `message`."""
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", BAD_SPECS)
def test_every_bad_key_or_value_is_one_line_naming_file_key_and_value(tmp_path, text, message):
    assert_refused(tmp_path / "bad.toml", text, message)


@pytest.mark.parametrize("text, message", [
    ('{"nodes": 2,}', "invalid JSON: "),
    ("[1, 2]", "expected an object of cluster figures at the top level, found [1, 2]"),
    ('{"nodes": 2, "device_flops": NaN}', "device_flops = nan: expected a number"),
])
def test_bad_json_specs(tmp_path, text, message):
    assert_refused(tmp_path / "bad.json", text, message)


def test_missing_files_unknown_names_and_bad_nodes(tmp_path):
    with pytest.raises(ConfigError, match=r"^.*nope\.toml: cluster spec file not found$"):
        load_cluster(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=re.escape("h200: neither a cluster spec file (.toml or .json) nor a built-in "
                                                    "cluster (built-in: a100-80g, h100-sxm)")):
        load_cluster("h200")
    other = tmp_path / "spec.yaml"
    other.write_text("nodes: 2\n")
    with pytest.raises(ConfigError, match=r"spec\.yaml: a cluster spec is a \.toml or \.json file$"):
        load_cluster(other)
    with pytest.raises(ConfigError, match=r"^nodes = 0: must be a positive integer$"):
        load_cluster("h100-sxm", nodes=0)
