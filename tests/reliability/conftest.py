"""Reliability tests inject real faults into real processes; they are slow by nature."""

import uuid

import pytest

from tests.reliability.helpers import versioned_bucket


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/reliability/" in str(item.fspath):
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def vbucket(s3):
    return versioned_bucket(s3, f"r-{uuid.uuid4().hex[:12]}")
