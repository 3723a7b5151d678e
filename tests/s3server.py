"""A local S3 API (moto's standalone server) on 127.0.0.1, for tests of object storage.

``s3`` (a fixture) starts one per test module on a free loopback port, points the usual AWS
environment at it (``AWS_ENDPOINT_URL`` and test credentials, which pyarrow, Ray workers started
afterwards and boto3 all read) and returns a function that creates a bucket and gives its URI."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="module")
def s3():
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a log line per request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        admin = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)

        def bucket(name: str) -> str:
            admin.create_dir(name)
            return f"s3://{name}"

        try:
            yield bucket
        finally:
            server.stop()
