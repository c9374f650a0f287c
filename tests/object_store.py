"""An S3-compatible server for tests: moto's standalone server (`moto_server`) as its own process on a free
port, with authentication on, so a wrong key is refused as AWS would refuse it. The code under test talks
to it over HTTP with the credentials in its environment, as it would to AWS or MinIO; nothing is mocked
inside the tested process. Stopped by PID.

    with s3_server() as s3:
        s3.upload(folder, "shards/")              # every file under folder -> s3://<bucket>/shards/...
        env = {**os.environ, **s3.env}            # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
"""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from servers import free_port, stop  # noqa: F401 - free_port: for the tests that import it from here

BUCKET = "cgspn-test"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    bucket: str = BUCKET

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": REGION}

    def client(self, secret: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.key_id,
                            aws_secret_access_key=secret or self.secret)

    def upload(self, folder: Path, prefix: str) -> list[str]:
        """Every file under `folder` to s3://bucket/<prefix><relative path>; returns the URLs."""
        client, urls = self.client(), []
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            key = prefix + path.relative_to(folder).as_posix()
            client.upload_file(str(path), self.bucket, key)
            urls.append(f"s3://{self.bucket}/{key}")
        return urls


@contextlib.contextmanager
def s3_server():
    """A running moto server with one bucket and one IAM user allowed s3:* (its keys in `env`)."""
    import boto3

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on port {port}")
                time.sleep(0.2)
        # Authentication on after the three calls that make the user: every later request must be signed
        # with its keys (moto's reset-auth: the number of requests let through unauthenticated).
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"3", method="POST",
                                                      headers={"Content-Type": "text/plain"}), timeout=5).read()
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="cgspn")
        key = iam.create_access_key(UserName="cgspn")["AccessKey"]
        iam.put_user_policy(UserName="cgspn", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        server = S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        stop(proc)
