"""Format detection, validation, canonical conversion and the data_converter tool."""
import json

import pytest

from megatron_patch.data import formats as F
from tests.data.corpora import llava_record, write_jsonl

pytestmark = pytest.mark.unit


def sharegpt_record(rid="s1", images=("a.jpg",)):
    return {"id": rid, "images": list(images),
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "<image>What is it?"},
                         {"role": "assistant", "content": "A cat."}]}


def test_detect_format():
    assert F.detect_format(llava_record("x", ["a.jpg"])) == "llava"
    assert F.detect_format(llava_record("x")) == "llava"  # text-only LLaVA
    assert F.detect_format(sharegpt_record()) == "sharegpt"
    assert F.detect_format({"conversations": [{"role": "user", "content": "hi"}]}) == "sharegpt"
    assert F.detect_format(["not", "a", "dict"]) is None
    assert F.detect_format({"id": 1}) is None


def test_llava_to_canonical():
    rec = llava_record(7, ["./imgs/a.jpg", "b.png"], question="Compare.", answer="Same.")
    assert F.validate_record(rec) == []
    assert F.to_canonical(rec) == {
        "id": "7", "images": ["imgs/a.jpg", "b.png"],
        "messages": [{"role": "user", "content": "<image>\n<image>\nCompare."},
                     {"role": "assistant", "content": "Same."}]}


def test_sharegpt_to_canonical_and_idempotent():
    canon = F.to_canonical(sharegpt_record())
    assert canon["messages"][0] == {"role": "system", "content": "Be brief."}
    assert canon["images"] == ["a.jpg"]
    assert F.to_canonical(canon) == canon  # canonical is valid ShareGPT input


def test_sharegpt_content_parts_and_from_value():
    rec = {"conversations": [
        {"from": "user", "value": [{"type": "image"}, {"type": "text", "text": " hi"}]},
        {"from": "assistant", "value": "hello"}], "images": ["x.png"]}
    canon = F.to_canonical(rec, index=3)
    assert canon["id"] == "sample-3"
    assert canon["messages"][0]["content"] == "<image> hi"


def test_missing_placeholder_is_prepended_llava_style():
    rec = llava_record("p", [])
    rec["image"] = ["a.jpg", "b.jpg"]
    rec["conversations"].insert(0, {"from": "system", "value": "sys"})
    canon = F.to_canonical(rec)
    assert canon["messages"][0] == {"role": "system", "content": "sys"}
    assert canon["messages"][1]["content"] == "<image>\n<image>\nDescribe."
    assert F.count_placeholders(canon["messages"]) == 2


def test_text_only_is_valid():
    canon = F.to_canonical(llava_record("t"))
    assert canon["images"] == [] and "<image>" not in canon["messages"][0]["content"]


@pytest.mark.parametrize("record,kind", [
    ("not a dict", F.MALFORMED),
    ({"id": "m", "conversations": "hello"}, F.MALFORMED),
    ({"id": "m", "conversations": [{"from": "human"}]}, F.MALFORMED),
    ({"id": "m", "image": 5, "conversations": [{"from": "human", "value": "x"}]}, F.MALFORMED),
    ({"id": "e", "conversations": []}, F.EMPTY),
    ({"id": "e", "conversations": [{"from": "human", "value": "q"}]}, F.EMPTY),
    ({"id": "e", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]}, F.EMPTY),
    ({"id": "r", "conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]}, F.WRONG_ROLE),
    ({"id": "r", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, F.WRONG_ROLE),
    ({"id": "r", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"},
                                   {"from": "gpt", "value": "a"}]}, F.WRONG_ROLE),
    (llava_record("c", ["a.jpg"], question="<image> again"), F.COUNT_MISMATCH),
    ({**llava_record("c"), "conversations": [{"from": "human", "value": "<image>"},
                                             {"from": "gpt", "value": "a"}]}, F.COUNT_MISMATCH),
    (llava_record("t", [f"{i}.jpg" for i in range(6)]), F.TOO_MANY),
    (llava_record("p", ["../outside.jpg"]), F.PATH_ESCAPE),
    (llava_record("p", ["/etc/passwd"]), F.PATH_ESCAPE),
    (llava_record("p", ["a/../../x.jpg"]), F.PATH_ESCAPE),
])
def test_problem_kinds(record, kind):
    problems = F.validate_record(record)
    assert problems and problems[0] == kind, problems
    with pytest.raises(F.RecordError, match=kind):
        F.to_canonical(record)


def test_forced_format_and_max_image_num():
    assert F.validate_record(sharegpt_record(), fmt="llava") == [F.MALFORMED]
    assert F.validate_record(llava_record("x", ["a.jpg", "b.jpg"]), max_image_num=1) == [F.TOO_MANY]
    with pytest.raises(ValueError, match="unknown format"):
        F.validate_record({}, fmt="alpaca")


def test_converter_validate_only_and_output(tmp_path, capsys):
    from toolkits.pretrain_data_preprocessing import data_converter

    records = [llava_record("ok1", ["a.jpg"]), sharegpt_record("ok2"), '{"broken json',
               {"id": "empty1", "conversations": []}, {"id": "empty2", "conversations": []},
               llava_record("mm", ["a.jpg"], question="<image><image>")]
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    assert data_converter.main(["--input", str(inp), "--validate-only"]) == 1
    out = capsys.readouterr().out
    assert "read 6  valid 2  invalid 4" in out
    assert "empty_conversation" in out and "empty1, empty2" in out and "#2" in out

    summary = data_converter.run(data_converter.parse_args(["--input", str(inp), "--validate-only"]))
    assert summary["problems"] == {"malformed_record": 1, "empty_conversation": 2,
                                   "image_count_mismatch": 1}

    dst = tmp_path / "out" / "canon.jsonl"
    assert data_converter.main(["--input", str(inp), "--output", str(dst)]) == 0
    lines = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["ok1", "ok2"]
    assert all(set(r) == {"id", "images", "messages"} for r in lines)

    # A clean file passes, as a JSON array too; --image-folder also checks files exist.
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([llava_record("ok1", ["a.jpg"])]))
    assert data_converter.main(["--input", str(clean), "--validate-only"]) == 0
    (tmp_path / "imgs").mkdir()
    assert data_converter.main(["--input", str(clean), "--validate-only",
                                "--image-folder", str(tmp_path / "imgs")]) == 1
    assert "missing_image" in capsys.readouterr().out
