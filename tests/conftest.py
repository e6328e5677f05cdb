"""Session-wide test setup. Environment first: Triton reads TRITON_INTERPRET
when a kernel is defined, so it must be set before any kernel module loads."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_TMPDIR", "/tmp/bdlora-ray-tests")


# ---- shared fixtures (appended below the environment setup on purpose) ----

import pytest  # noqa: E402

# What every process of the test cluster finds in its environment (AWS_ENDPOINT_URL, which differs
# per test server, travels in GroupSpec.env_vars).
CLUSTER_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_SESSION_TOKEN": "testing", "AWS_CONFIG_FILE": "/dev/null",
                   "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session, temp files under RAY_TMPDIR."""
    import ray

    from s3_server import patched_env

    tmp = os.environ["RAY_TMPDIR"]
    os.makedirs(tmp, exist_ok=True)
    # A throwaway loopback cluster needs no token; this also keeps tests from writing ~/.ray.
    # Its processes inherit this environment, as a node's processes inherit the node's: that is how
    # the adapter store gets S3 credentials (fake ones here; the test S3 server takes any), never
    # through a runtime_env, which Ray would keep in its control store.
    with patched_env({"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **CLUSTER_AWS_ENV},
                     drop=("AWS_PROFILE", "AWS_ENDPOINT_URL_S3")):
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
        yield ray
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 and AWS env vars pointing at it (restored afterwards)."""
    from s3_server import MotoS3, patched_env

    server = MotoS3()
    # Profiles and config files could point elsewhere; the env vars alone must decide.
    drop = ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL_S3")
    with patched_env({**server.env, "AWS_CONFIG_FILE": "/dev/null",
                      "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}, drop=drop):
        yield server
    server.stop()
