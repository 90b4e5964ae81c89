"""Shared eval readers: parquet / Arrow tables with images read on demand."""

import io

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from globalcom2.eval.base import DataError, Sample, TableCell, decode_image, read_table, table_rows

from conftest import make_image


def _png(h, w, seed):
    buf = io.BytesIO()
    make_image(h, w, seed).save(buf, format="PNG")
    return buf.getvalue()


def _table():
    images = [{"bytes": _png(8, 10, i), "path": f"{i}.png"} for i in range(5)]
    images[3] = None  # a row without an image
    return pa.table({"question_id": list(range(5)), "question": [f"q{i}" for i in range(5)], "image": images})


def test_parquet_images_are_read_on_demand(tmp_path):
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(_table(), path, row_group_size=2)  # three row groups
    rows = read_table(path, "fixture")
    assert [r["question_id"] for r in rows] == list(range(5))
    assert rows[3]["image"] is None
    cells = [r["image"] for r in rows if r["image"] is not None]
    assert all(isinstance(c, TableCell) for c in cells)
    assert [c.group for c in cells] == [0, 0, 1, 2] and [c.row for c in cells] == [0, 1, 0, 0]
    for r in rows:
        if r["image"] is not None:
            img = Sample(id=str(r["question_id"]), prompt="", image=r["image"]).load_image()
            expected = make_image(8, 10, r["question_id"]).convert("RGB")
            assert img.size == (10, 8) and img.tobytes() == expected.tobytes()


def test_arrow_files_are_memory_mapped_and_lazy(tmp_path):
    path = tmp_path / "data-00000-of-00001.arrow"
    table = _table()
    with ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table)
    rows = read_table(tmp_path, "fixture")
    assert rows[3]["image"] is None and isinstance(rows[4]["image"], TableCell)
    assert decode_image(rows[4]["image"]).size == (10, 8)


def test_a_vanished_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(_table(), path)
    cell = read_table(path, "fixture")[0]["image"]
    path.unlink()
    from globalcom2.eval import base

    base._column_chunk.cache_clear()
    with pytest.raises(DataError, match="x.parquet"):
        decode_image(cell, "image of sample 0")


def test_corrupt_table_names_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet"):
        read_table(bad, "fixture")


def test_table_rows_number_rows_across_shards_and_name_a_missing_field(tmp_path):
    table = _table()
    pq.write_table(table.slice(0, 3), tmp_path / "test-00000-of-00002.parquet")
    pq.write_table(table.slice(3), tmp_path / "test-00001-of-00002.parquet")
    shards = sorted(tmp_path.glob("test-*.parquet"))
    got = list(table_rows(shards, "lmms-lab Toy", ("question_id", "question")))
    assert [r["question_id"] for r, _ in got] == list(range(5))
    assert [w for _, w in got] == [f"{tmp_path} (lmms-lab Toy), row {n}" for n in range(5)]
    with pytest.raises(DataError, match=r"\(lmms-lab Toy\), row 0: missing field\(s\) answer"):
        list(table_rows(shards, "lmms-lab Toy", ("question_id", "answer")))


def test_null_flags_come_from_a_small_child_not_the_image_bytes(tmp_path):
    from globalcom2.eval.base import _null_probe

    images = [{"bytes": b"x" * 10, "path": None}, None, {"bytes": None, "path": "a.png"}, {"bytes": b"y", "path": "b"}]
    table = pa.table({"id": [0, 1, 2, 3], "image": images, "plain": [b"1", None, b"3", b"4"]})
    assert _null_probe(table.schema.field("image")) == "image.path"
    assert _null_probe(table.schema.field("plain")) == "plain"
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=3)
    rows = read_table(path, "fixture", lazy=("image", "plain"))
    assert [r["image"] is None for r in rows] == [False, True, False, False]
    assert [r["plain"] is None for r in rows] == [False, True, False, False]
    assert all(isinstance(r["image"], TableCell) for r in rows if r["image"] is not None)
