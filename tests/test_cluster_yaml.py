"""cluster/gpu.yaml, checked offline: Ray's cluster-launcher schema, a head that runs no trials, security, versions."""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ndot.sweep import resources
from ndot.sweep.definitions import PAPER

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "gpu.yaml").read_text())


def _commands(config: dict, *keys: str) -> str:
    return "\n".join(c for k in keys for c in config.get(k, []))


def test_matches_the_cluster_launcher_schema(config):
    # What `ray up` does before it talks to AWS.
    validate_config(prepare_config(config))


def test_head_advertises_no_cpu_so_no_trial_lands_there(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert "--num-cpus=0" in _commands(config, "head_start_ray_commands")
    # The driver (under `ray job submit`) and the autoscaler live there: a spot reclaim would end both.
    assert "InstanceMarketOptions" not in head["node_config"]


def test_workers_are_autoscaling_gpu_nodes(config):
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert node["min_workers"] == 0 and node["max_workers"] > 0, name
        assert node["resources"]["GPU"] >= 1 and node["resources"]["CPU"] >= 1, name
        assert node["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name


def test_every_node_has_an_instance_profile_for_the_shared_storage(config):
    for name, node in config["available_node_types"].items():
        assert "IamInstanceProfile" in node["node_config"], name


def test_only_ssh_is_reachable_from_outside(config):
    # Ray's default group allows SSH from anywhere and everything inside the
    # group; any extra rule here, or a group of one's own, would widen that.
    extra = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert all(rule.get("FromPort") == rule.get("ToPort") == 22 for rule in extra)
    for name, node in config["available_node_types"].items():
        assert "SecurityGroupIds" not in node["node_config"], name
    head_start = _commands(config, "head_start_ray_commands")
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", head_start)
    assert "0.0.0.0" not in yaml.safe_dump(config)


def test_token_auth_is_on_for_every_ray_process(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if " start " in f" {c} "]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert "disabled" not in yaml.safe_dump(config).lower()
    # And every client on a node: `ray status` through `ray exec`, a driver run over SSH.
    assert "echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in _commands(config, "setup_commands")
    assert any("auth_token" in remote for remote in config["file_mounts"])


def test_every_node_installs_this_project_with_the_pinned_ray(config):
    # The main dependency (ray[tune]) and the cluster extra (ray[default]) pin the Ray this test runs with.
    pins = re.findall(r'"ray\[(\w+)\]==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    assert {extra for extra, _ in pins} == {"tune", "default"}
    assert all(version == ray.__version__ for _, version in pins)
    mounted = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert mounted
    # setup_commands run on every node, head and workers.
    setup = _commands(config, "setup_commands")
    assert re.search(rf"pip install .*-e \"?{re.escape(mounted[0])}\[cluster\]", setup)


def test_every_shell_on_a_node_runs_the_projects_python(config):
    # `ray submit` runs `python SCRIPT` and `ray attach` opens a shell, in a bash that reads ~/.bashrc:
    # the system's Python there has neither ndot nor Ray. The venv is the one Ray itself starts from.
    venv = re.search(r"(~/[\w-]+)/bin/ray start", _commands(config, "head_start_ray_commands")).group(1)
    line = f'export PATH="{venv.replace("~", "$HOME")}/bin:$PATH"'
    assert f"echo '{line}' >> ~/.bashrc" in _commands(config, "setup_commands")
    # boto3, with which the head's autoscaler launches the workers, comes with the cluster extra.
    assert re.search(r'^cluster = \[.*"boto3', (ROOT / "pyproject.toml").read_text(), re.M)


def test_a_driver_started_over_ssh_can_outlive_the_connection(config):
    # `ray submit --tmux` and `ray attach --tmux` (docs/cluster.md) need tmux on the head, which a bare image may lack.
    assert re.search(r"apt-get .*install .*\btmux\b", _commands(config, "setup_commands"))


def _rsync_leaves_out(path: str, pattern: str) -> bool:
    """Whether rsync's exclude `pattern` leaves out `path` (from the transfer's root), itself or a folder of it.
    rsync's rules: a leading / anchors at the root; a pattern with another / or ** matches the end of a
    path; one without matches a single name, at any depth."""
    pattern, parts = pattern.rstrip("/"), path.split("/")
    for i in range(1, len(parts) + 1):
        if pattern.startswith("/"):
            hit = fnmatch.fnmatchcase("/".join(parts[:i]), pattern[1:])
        elif "/" in pattern or "**" in pattern:
            hit = any(fnmatch.fnmatchcase("/".join(parts[j:i]), pattern) for j in range(i))
        else:
            hit = fnmatch.fnmatchcase(parts[i - 1], pattern)
        if hit:
            return True
    return False


def test_every_file_of_the_project_reaches_the_nodes(config):
    # `ray up` copies the checkout with rsync_exclude and .gitignore's lines as rsync patterns: an unanchored
    # "data" left out the package ndot/data, and `from ndot import data` in setup_commands failed on every node.
    assert _rsync_leaves_out("ndot/data/cifar.py", "data") and not _rsync_leaves_out("ndot/data/cifar.py", "/data")
    assert _rsync_leaves_out("data/cifar-10-batches-py/data_batch_1", "/data")
    assert config["rsync_filter"] == [".gitignore"]
    patterns = config["rsync_exclude"] + [
        line for line in (ROOT / ".gitignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    shipped = [p.relative_to(ROOT).as_posix() for d in ("ndot", "sweeps") for p in (ROOT / d).rglob("*.py")]
    shipped += ["pyproject.toml", "README.md"]
    assert len(shipped) > 40
    left_out = {(path, pattern) for path in shipped for pattern in patterns if _rsync_leaves_out(path, pattern)}
    assert not left_out


def test_a_paper_sweep_asks_for_every_slot_of_the_grown_cluster(config):
    # 8 x g5.2xlarge (8 CPUs, 1 GPU) + 2 x g5.12xlarge (48 CPUs, 4 GPUs) = 16 GPUs, four trials each;
    # the head advertises no CPU and holds none.
    assert resources.grown_slots(PAPER.cpus_per_trial, PAPER.gpus_per_trial, config) == 64


def test_the_spot_quota_the_cluster_guide_asks_for_holds_every_worker(config):
    # A worker type's CPU resource is its instance's vCPUs, which AWS's spot quota counts.
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    vcpus = sum(t["max_workers"] * t["resources"]["CPU"] for t in workers)
    assert f"of {vcpus} vCPUs" in " ".join((ROOT / "docs" / "cluster.md").read_text().split())
