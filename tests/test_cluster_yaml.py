"""cluster.yaml passes Ray's own cluster-config checks, and what it deploys fits its GPU nodes."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_and_checks(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before launching anything: fill in the provider's defaults, then validate
    # against ray/autoscaler/ray-schema.json plus Ray's own consistency checks.
    validate_config(prepare_config(copy.deepcopy(cluster)))
    assert cluster["provider"]["type"] == "aws"


def test_schema_check_is_real(cluster):
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_8x_a100"]["min_workers"] = "one"
    with pytest.raises(ValidationError):
        validate_config(prepare_config(broken))


def _gpu_type(cluster: dict) -> dict:
    (name,) = [n for n, t in cluster["available_node_types"].items() if t.get("resources", {}).get("GPU")]
    return cluster["available_node_types"][name]


def test_worker_type_is_an_autoscaling_8_gpu_node(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = _gpu_type(cluster)
    assert gpu["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert gpu["resources"]["GPU"] == 8
    assert 0 <= gpu["min_workers"] < gpu["max_workers"] <= cluster["max_workers"]


def test_setup_installs_the_package_and_the_head_deploys_the_app(cluster):
    assert any("pip install" in c and "/home/ray/bdlora-ray" in c for c in cluster["setup_commands"])
    assert cluster["file_mounts"]["/home/ray/bdlora-ray"] == "."
    head = " ; ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in head and "serve deploy deploy/serve_config.yaml" in head
    for cmd in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        shlex.split(cmd)  # well-formed shell words


def test_serve_config_is_valid_and_runs_tp8_groups_that_fill_a_gpu_node(cluster, serve_config):
    from ray.serve.schema import ServeDeploySchema

    from deploy.config import AppConfig

    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "deploy:app" and app["route_prefix"] == "/"
    env = app["runtime_env"]["env_vars"]
    assert all(isinstance(v, str) for v in env.values())  # env vars must be strings
    config = AppConfig.from_env(env)
    assert config.group.tp == 8 and config.group.use_gpu
    bundles = config.group.bundles()
    node = _gpu_type(cluster)["resources"]
    assert sum(b.get("GPU", 0) for b in bundles) == node["GPU"] == 8
    assert sum(b.get("CPU", 0) for b in bundles) <= node["CPU"]
    # Serve may run as many groups as there are GPU nodes to hold them.
    assert config.scaling.max_groups <= _gpu_type(cluster)["max_workers"]


def test_the_app_is_importable_from_the_synced_checkout(cluster, serve_config):
    """deploy/ is not installed (it would shadow a published `deploy`): the application's processes
    find `deploy:app` in the checkout cluster.yaml syncs to every node, through PYTHONPATH."""
    (app,) = serve_config["applications"]
    assert app["import_path"] == "deploy:app"
    (checkout,) = [target for target, source in cluster["file_mounts"].items() if source == "."]
    assert app["runtime_env"]["env_vars"]["PYTHONPATH"] == checkout
    assert (ROOT / "deploy" / "__init__.py").is_file()


def test_scaling_knobs_are_valid_for_serve_and_keep_nodes_for_the_groups(cluster, serve_config):
    """The autoscaling chain of cluster.yaml and serve_config.yaml (README "Scaling"): Serve accepts
    the knobs; its averaging window outlasts the 10 s between its metric reports; it removes groups
    more slowly than it adds them (no flapping); it never asks for more groups than nodes can hold."""
    from ray.serve.config import AutoscalingConfig

    from deploy.config import AppConfig

    (app,) = serve_config["applications"]
    s = AppConfig.from_env(app["runtime_env"]["env_vars"]).scaling
    knobs = AutoscalingConfig(**s.autoscaling_config())
    assert knobs.upscale_delay_s == s.upscale_delay_s and knobs.downscale_delay_s == s.downscale_delay_s
    assert s.min_groups < s.max_groups == _gpu_type(cluster)["max_workers"]
    assert s.look_back_period_s > 10
    assert s.downscale_delay_s > s.upscale_delay_s and s.graceful_shutdown_timeout_s > 0
    assert cluster["upscaling_speed"] > 0 and cluster["idle_timeout_minutes"] > 0
