"""Shared fixtures: the authors' reference data, checkpoint files and real services."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The original code's outputs (carried in tests/data/reference) with the reference
    weights regenerated from their seeds as checkpoint files in ``weights/``."""
    from tests.refdata import reference_tree

    return reference_tree(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="session")
def checkpoints(reference) -> dict[str, Path]:
    """Checkpoint files in the authors' format for each mode (the reference weights)."""
    return {"photorealistic": reference / "weights" / "photorealistic-seed0.pt",
            "artistic": reference / "weights" / "artistic-seed1.pt"}


def reference_cases() -> list[dict]:
    """Cases of the reference data's cases.json."""
    from tests.refdata import cases

    return cases()


# --- real services -----------------------------------------------------------------------------
import uuid  # noqa: E402

from tests.services import AWS_ENV, MotoServer  # noqa: E402


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """moto's S3 server over HTTP for the whole session (tests use their own buckets)."""
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(moto_server):
    """A boto3 client pointed at the moto server."""
    import boto3

    for k, v in AWS_ENV.items():
        os.environ.setdefault(k, v)
    return boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def bucket(s3):
    """A fresh bucket."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name
