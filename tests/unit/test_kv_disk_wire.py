"""The directory tier's page files: what is written reads back, anything else is refused."""
import os

import numpy as np
import pytest

from shoal.comm.kv_disk_wire import (
    page_file_bytes,
    page_file_path,
    read_page_file,
    write_page_file,
)

KEY = "ab" * 32
SHAPE = (2, 2, 4, 3, 8)  # [layers, 2, page_size, kv_heads, head_dim]


def page() -> np.ndarray:
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)


def test_a_page_reads_back_and_its_size_is_bounded(tmp_path):
    size = write_page_file(str(tmp_path), "me", KEY, page())
    assert os.path.getsize(page_file_path(str(tmp_path), KEY)) == size
    assert size <= page_file_bytes("me", SHAPE, np.dtype(np.float32))
    assert np.array_equal(read_page_file(str(tmp_path), "me", KEY, SHAPE, np.float32), page())
    assert os.listdir(tmp_path) == [KEY + ".kv"]  # no temporary file left


@pytest.mark.parametrize("spoil, message", [
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "checksum"),
    (lambda raw: raw[:-4], "bytes of pages"),
    (lambda raw: b"NOTSHOAL" + raw[8:], "not a shoal KV page file"),
    (lambda raw: raw[:12] + b"[" + raw[13:], "unreadable header"),
])
def test_a_damaged_file_is_refused(tmp_path, spoil, message):
    write_page_file(str(tmp_path), "me", KEY, page())
    path = page_file_path(str(tmp_path), KEY)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(spoil(raw))
    with pytest.raises(ValueError, match=message):
        read_page_file(str(tmp_path), "me", KEY, SHAPE, np.float32)


def test_a_strangers_file_is_refused(tmp_path):
    write_page_file(str(tmp_path), "someone-else", KEY, page())
    with pytest.raises(ValueError, match="identity"):
        read_page_file(str(tmp_path), "me", KEY, SHAPE, np.float32)
    with pytest.raises(ValueError, match="shape"):
        write_page_file(str(tmp_path), "me", KEY, page())
        read_page_file(str(tmp_path), "me", KEY, (2, 2, 8, 3, 4), np.float32)
    os.rename(page_file_path(str(tmp_path), KEY), page_file_path(str(tmp_path), "cd" * 32))
    with pytest.raises(ValueError, match="key"):  # renamed: the header names another page
        read_page_file(str(tmp_path), "me", "cd" * 32, SHAPE, np.float32)
    with pytest.raises(ValueError, match="not a page key"):
        page_file_path(str(tmp_path), "../etc")
