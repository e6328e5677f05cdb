"""`make run` (`python -m deploy.embedded`): the whole system on this machine.

With nothing configured: SmolLM2-135M-Instruct converted once under
`.bdlora/`, a local S3 server (moto) on 127.0.0.1:8001 holding its demo
adapters (deploy/demo_adapters/) pushed with `bdlora push`, one replica group
at TP=3 on CPU, and the OpenAI API on http://127.0.0.1:8000, built exactly as
`serve run deploy:app` builds it. BDLORA_DEMO_MODEL=tiny serves the tiny
random Llama with random adapters at TP=2 instead.
BDLORA_MODEL_PATH / BDLORA_ADAPTERS_URI (deploy/config.py) replace the seeded
model / local S3 with real ones. Blocks until Ctrl-C or SIGTERM; either stops it the same way:
Serve shuts down gracefully (in-flight requests finish or end with an error), exit status 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

from deploy.config import AppConfig, without_credentials
from deploy.local_s3 import LocalS3, LocalS3Error
from deploy.seed import seed_adapters, seed_trained_adapters, smollm2_checkpoint, write_checkpoint

log = logging.getLogger("deploy.embedded")

APP_NAME = "bdlora"


def prepare(config: AppConfig) -> tuple[AppConfig, LocalS3 | None]:
    """Seed what is not configured; returns the config to serve and the local S3 server (or None)."""
    e, g = config.embedded, config.group
    tiny = e.demo_model == "tiny"
    if e.seed_model and tiny:
        write_checkpoint(Path(g.model_path))
    elif e.seed_model:
        smollm2_checkpoint(Path(g.model_path).parent)  # model_path is <state dir>/SmolLM2-135M-Instruct
    server = None
    if e.local_s3:
        try:
            server = LocalS3(e.s3_port).start()
        except LocalS3Error as err:
            raise SystemExit(f"{err}; set BDLORA_S3_PORT, or BDLORA_ADAPTERS_URI to a real bucket") from None
        env = server.env
        os.environ.update(env)  # for the seeding below, and inherited by the local Ray cluster started later
        if tiny:
            names = seed_adapters(Path(g.model_path), Path(e.state_dir, "peft"), g.adapters_uri, g.tp)
        else:
            names = seed_trained_adapters(Path(g.model_path), g.adapters_uri, g.tp)
        log.info("local S3 at %s holds %s under %s", env["AWS_ENDPOINT_URL"], ", ".join(names), g.adapters_uri)
        # The groups' stores need the endpoint; the fake credentials they inherit from this process.
        config = replace(config, group=replace(g, env_vars=without_credentials(env)))
    return config, server


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("werkzeug", "botocore"):  # a line per S3 request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config, server = prepare(AppConfig.from_env())
    import ray
    from ray import serve

    from deploy import build_app
    from deploy.cluster_env import cluster_env

    e = config.embedded
    os.environ.update(cluster_env(e.http_front))  # read by the local cluster's processes (deploy/cluster_env.py)
    ray.init(address="local", _temp_dir=e.ray_temp_dir, include_dashboard=False)  # its own cluster
    stop = threading.Event()
    # After ray.init, which installs a SIGTERM handler of its own that aborts the process.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": e.host, "port": e.port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        log.info("serving %s and its adapters on http://%s:%d/v1 (Ctrl-C stops)", config.api.model_name,
                 e.host, e.port)
        while not stop.wait(1.0):  # a timed wait: Ctrl-C's KeyboardInterrupt gets through too
            pass
        log.info("SIGTERM: stopping")
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        try:
            # The application first, while the HTTP proxy still runs: its replicas stop taking requests
            # and finish the ones in flight (graceful shutdown), whose responses still reach clients.
            serve.delete(APP_NAME)
        except Exception:
            log.warning("the application did not shut down gracefully", exc_info=True)
        serve.shutdown()
        ray.shutdown()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
