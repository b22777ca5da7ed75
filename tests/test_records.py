"""The validation layer of users' annotation files (data/records.py): every fault names file, record and key."""

import json

import pytest

from aimv2.data.records import RecordAt, RecordError, field, read_json, read_json_records


def test_json_syntax_error_names_file_line_and_column(tmp_path):
    p = tmp_path / "ann.json"
    p.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(RecordError, match=r"ann.json, line 2, column 12\); fix the file there \(a COCO file\)"):
        read_json(p, "a COCO file")


def test_records_from_a_list_or_json_lines(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    a.write_text(json.dumps([{"x": 1}, {"x": 2}]))
    b.write_text('{"x": 1}\n\n{"x": 2}\n')
    assert read_json_records(a, "rows") == read_json_records(b, "rows") == [{"x": 1}, {"x": 2}]
    b.write_text('{"x": 1}\n{"x": 2\n')
    with pytest.raises(RecordError, match=r"b.jsonl, line 2, column"):
        read_json_records(b, "rows")
    a.write_text("[]")
    with pytest.raises(RecordError, match="no records"):
        read_json_records(a, "rows")
    a.write_text('{"x": 1}')  # one object that is no list: read as one JSON line, then fine
    assert read_json_records(a, "rows") == [{"x": 1}]
    with pytest.raises(FileNotFoundError):
        read_json_records(tmp_path / "missing.json", "rows")


def test_field_names_file_section_record_and_key():
    where = RecordAt("coco.json", "annotations", 7)
    assert field({"bbox": [1, 2, 3, 4]}, "bbox", list, where=where, fix="x") == [1, 2, 3, 4]
    with pytest.raises(RecordError, match=r"^no 'bbox' \(coco.json, annotations, record 7\); give a box$"):
        field({}, "bbox", list, where=where, fix="give a box")
    with pytest.raises(RecordError, match=r"'height' is a str, not a int or float"):
        field({"height": "480"}, "height", (int, float), where=where, fix="x")
    with pytest.raises(RecordError, match="is a bool"):
        field({"height": True}, "height", (int, float), where=where, fix="x")
    with pytest.raises(RecordError, match=r"a JSON list, not an object"):
        field([], "bbox", list, where=where, fix="x")
    assert field({}, "area", float, where=where, fix="x", optional=True) is None
