"""Ray's own CLI with the shipped configs: `serve run serve/config/serve_local.yaml` deploys the
app through Serve's builder contract (one dict argument; the YAML's `deployments:` applied by Ray).

The config is the shipped file with only the HTTP port changed (a free one); the command runs
in a temp directory so the YAML's relative `data_dir` lands there.
"""
from __future__ import annotations

import os
import shutil

import pytest
import yaml

from cluster_support import ray_env, short_tmp, tool, tracked, wait_http
from helpers import free_port

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

START_LIMIT_S = 420  # a bound for a stuck start on a busy 2-core machine; never asserted


def _shipped(name: str) -> dict:
    from serve.deployments import default_config_path, load_config

    return load_config(default_config_path(name))


def test_builder_takes_exactly_one_dict_argument():
    """Ray's contract, checked the way Ray checks it before calling a builder."""
    import inspect

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from serve.deployments import build_app

    params = list(inspect.signature(build_app).parameters.values())
    assert len(params) == 1 and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    app = call_user_app_builder_with_args_if_necessary(build_app, {"models": ["tiny-sd15"], "device": "cpu"})
    assert isinstance(app, Application)


@pytest.mark.parametrize("name", ["serve_local.yaml", "serve_cluster.yaml"])
def test_shipped_configs_validate_against_serves_schema(name):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(_shipped(name))
    app = schema.applications[0]
    assert app.import_path == "serve.deployments:build_app"
    assert {d.name for d in app.deployments} == {"AvatarIngress", "AvatarModel"}


def test_serve_run_with_the_shipped_local_config(tmp_path):
    cfg = _shipped("serve_local.yaml")
    port = free_port()
    cfg["http_options"]["port"] = port
    path = tmp_path / "serve_local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # RAY_ADDRESS=local: start a private Ray even if another instance runs on this machine.
    ray_tmp = short_tmp("aecli")
    env = ray_env(RAY_ADDRESS="local", RAY_TMPDIR=ray_tmp)
    try:
        with tracked([tool("serve"), "run", str(path)], env=env, cwd=str(tmp_path)) as proc:
            health = wait_http(f"http://127.0.0.1:{port}/v1/health", START_LIMIT_S, proc).json()
            assert health["status"] == "ok" and health["defaultModel"] == "tiny-sd15", health
            assert [m["name"] for m in health["models"]] == ["tiny-sd15"]
            # The YAML's relative data_dir resolved where `serve run` ran: the SQLite db is there.
            assert os.path.exists(tmp_path / ".avatar-engine" / "avatar.db")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
