"""Fixtures of the data tests."""

import pytest
from coco_files import CocoWriter


@pytest.fixture
def coco_writer(tmp_path):
    return CocoWriter(tmp_path)
