"""Shared fixtures: the authors' reference data, and helpers for small test images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _reference_dir() -> Path | None:
    explicit = os.environ.get("CAPVST_REFERENCE_DIR")
    candidates = [explicit] if explicit else [REPO.parent / "shared" / "reference",
                                              "/work/shared/reference"]
    for c in candidates:
        if c and (Path(c) / "cases.json").is_file():
            return Path(c)
    return None


REFERENCE = _reference_dir()


@pytest.fixture(scope="session")
def reference() -> Path:
    """The folder of the original code's outputs; CI (CAPVST_REQUIRE_REFERENCE=1) must have it."""
    if REFERENCE is None:
        if os.environ.get("CAPVST_REQUIRE_REFERENCE") == "1":
            pytest.fail("reference data (../shared/reference) is missing but "
                        "CAPVST_REQUIRE_REFERENCE=1; set CAPVST_REFERENCE_DIR")
        pytest.skip("no reference data on this machine (../shared/reference or "
                    "CAPVST_REFERENCE_DIR); parity tests need the original code's outputs")
    return REFERENCE


def reference_cases() -> list[dict]:
    """Cases of cases.json, or [] when the folder is missing (tests then skip or fail above)."""
    if REFERENCE is None:
        return [{"name": "missing-reference"}]
    return list(json.loads((REFERENCE / "cases.json").read_text())["cases"])


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
