"""Cluster definitions and job entrypoints: parsed and validated, no cloud calls."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET = re.compile(r"(AKIA[0-9A-Z]{16}|(aws_secret_access_key|wandb_api_key)\s*[:=]\s*[A-Za-z0-9/+]{8,})", re.I)


def test_cluster_launcher_yaml_passes_rays_own_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())
    validate_config(prepare_config(cfg))  # Ray's defaults filled in, then its JSON schema; no cloud calls
    assert cfg["provider"]["type"] == "aws"
    gpu = cfg["available_node_types"]["gpu_8x_a100"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1  # autoscales from zero
    assert gpu["node_config"]["InstanceType"] == "p4d.24xlarge"  # 8 GPUs per node
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    spot = cfg["available_node_types"]["gpu_8x_a100_spot"]  # beside on-demand, the same nodes as spot
    assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"} and spot["min_workers"] == 0
    assert spot["node_config"]["InstanceType"] == gpu["node_config"]["InstanceType"]


def test_kuberay_rayjob_autoscales_gpu_workers_and_takes_secrets_from_a_secret():
    job = yaml.safe_load((ROOT / "cluster/kuberay.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert sorted(groups) == ["gpu-8x", "gpu-8x-spot"]
    for group in groups.values():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert container["envFrom"] == [{"secretRef": {"name": "clippy-ray-secrets"}}]
    spot = groups["gpu-8x-spot"]["template"]["spec"]
    assert spot["nodeSelector"] == {"karpenter.sh/capacity-type": "spot"}
    assert any(t.get("value") == "spot" for t in spot["tolerations"])
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/train.py"] and (ROOT / entry[1]).exists()
    assert (ROOT / entry[entry.index("--config") + 1]).exists()


def test_no_secrets_in_cluster_or_job_files():
    for path in [*ROOT.glob("cluster/*"), *ROOT.glob("jobs/*"), *ROOT.glob("configs/*")]:
        assert not SECRET.search(path.read_text()), path


def test_job_entrypoints_run_from_a_working_dir_copy(tmp_path):
    runtime = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())
    assert ".venv" in runtime["excludes"] and "runs" in runtime["excludes"]
    for script, expected in (("jobs/train.py", "--from-mode"), ("jobs/make_benchmark.py", "--rows")):
        out = subprocess.run(
            [sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert out.returncode == 0 and expected in out.stdout, out.stderr[-1000:]


def test_every_cluster_definition_runs_the_drivers_ray_and_python_with_a_job_server():
    """`ray job submit` needs the dashboard's job server (ray[default]) on the head, and the package
    needs Python >= 3.10: the launcher's Docker image, the Dockerfile and the RayJob all use Ray's
    2.60 py311 image, and the launcher's head profile is not the workers' S3-only one."""
    import ray

    launcher = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())
    image = launcher["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py31")
    assert any("ray[default" in cmd and f"=={ray.__version__}" in cmd for cmd in launcher["setup_commands"])
    dockerfile = (ROOT / "cluster/Dockerfile").read_text()
    assert f"FROM {image}" in dockerfile and f'"ray[default,train,data,tune]=={ray.__version__}"' in dockerfile
    nodes = launcher["available_node_types"]
    head_profile = nodes["head"]["node_config"]["IamInstanceProfile"]["Name"]
    assert all(head_profile != n["node_config"]["IamInstanceProfile"]["Name"] for k, n in nodes.items() if k != "head")
    job = yaml.safe_load((ROOT / "cluster/kuberay.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
