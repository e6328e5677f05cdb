"""deploy/local_s3.py: the one local S3 start-up the embedded default, the benchmarks and the tests share."""

from __future__ import annotations

import socket

import boto3
import pytest

from deploy.local_s3 import LOCAL_CREDENTIAL, LocalS3, LocalS3Error, free_port


def _round_trip(s3: LocalS3) -> bytes:
    """A bucket, an object written and read back, by a client made only from `s3.env`."""
    env = s3.env
    client = boto3.session.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                                   region_name=env["AWS_DEFAULT_REGION"]).client("s3",
                                                                                 endpoint_url=env["AWS_ENDPOINT_URL"])
    s3.create_bucket("round-trip")
    client.put_object(Bucket="round-trip", Key="a/b.json", Body=b'{"x": 1}')
    return client.get_object(Bucket="round-trip", Key="a/b.json")["Body"].read()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("in_process", [True, False], ids=["thread", "subprocess"])
def test_serves_s3_and_stops(in_process):
    with LocalS3(in_process=in_process) as s3:
        assert s3.port > 0 and s3.endpoint == f"http://127.0.0.1:{s3.port}"
        assert _round_trip(s3) == b'{"x": 1}'
        port = s3.port
    assert not _listening(port)


def test_env_points_at_it_with_fake_credentials_only():
    s3 = LocalS3(port=12345)
    env = s3.env
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:12345"
    assert {env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")} == {LOCAL_CREDENTIAL}
    # no profile or credentials file can add real credentials
    assert env["AWS_CONFIG_FILE"] == env["AWS_SHARED_CREDENTIALS_FILE"] == "/dev/null"


def test_a_taken_port_is_an_error_not_a_hang():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for in_process in (True, False):
            with pytest.raises(LocalS3Error, match=f"port {port} .* is taken"):
                LocalS3(port=port, in_process=in_process).start()


def test_embedded_start_up_names_the_setting_for_a_taken_port(tmp_path):
    from dataclasses import replace

    from deploy.config import AppConfig
    from deploy.embedded import prepare

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        config = AppConfig.from_env({"BDLORA_S3_PORT": str(port), "BDLORA_STATE_DIR": str(tmp_path)})
        config = replace(config, embedded=replace(config.embedded, seed_model=False))
        with pytest.raises(SystemExit, match="BDLORA_S3_PORT"):
            prepare(config)
