"""Files the commands write get the user's umask, like any new file (issue 29, point 9):
safetensors' save_file creates its file 0600, which `globalcom2 embed` used to leave as it was."""

from __future__ import annotations

import os
import stat

import pytest

from globalcom2._io import atomic_path
from globalcom2.cli import main

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


@pytest.fixture
def umask():
    def set_mask(mask):
        previous.append(os.umask(mask))

    previous: list[int] = []
    yield set_mask
    for mask in reversed(previous):
        os.umask(mask)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_an_atomic_write_gets_the_umask_mode_whatever_the_writer_made(tmp_path, umask, mask):
    umask(mask)
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors does
        os.close(fd)
    assert _mode(target) == 0o666 & ~mask


def test_embed_writes_its_file_with_the_umask_mode(tmp_path, umask, image_factory):
    umask(0o022)
    image = tmp_path / "a.png"
    image_factory(336, 336).save(image)
    out = tmp_path / "e.safetensors"
    assert main(["embed", "--model", "tiny", "--image", str(image), "--out", str(out)]) == 0
    assert _mode(out) == 0o644
    # the same mode as the files the other commands write
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0
    assert _mode(tmp_path / "demo" / "summary.json") == _mode(out)
