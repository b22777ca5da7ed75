"""The webdataset shard reader: real CC12M shard read completely, every kind of fault skipped and counted (never a
crash, never an empty epoch without an error), disjoint and complete splits over ranks x workers, caption choice, and
the ``aimv2 data synth`` -> ``aimv2 data inspect`` round trip."""

import gzip
import io
import json
import logging
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from aimv2.cli import main
from aimv2.data.faults import FaultCounter, FaultRateError
from aimv2.data.sources.shards import CaptionPicker, ShardSamples, parse_caption_spec, shard_captions
from aimv2.data.sources.tar import MemberSpan, expand_urls, member_names, shard_samples
from aimv2.data.synthetic.dataset import synthetic_sample
from aimv2.data.synthetic.shards import write_synthetic_shards

REAL_SHARD = Path(__file__).resolve().parents[1].parent / "shared/data/cc12m-train-0000.tar"
needs_real = pytest.mark.skipif(
    not REAL_SHARD.is_file(), reason=f"real CC12M test shard not found at {REAL_SHARD} (../shared/data from the repo)"
)


def _jpeg(i: int = 0, size: int = 32) -> bytes:
    buf = io.BytesIO()
    synthetic_sample(i, 0, size)[0].save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _good(key: str, i: int = 0) -> list[tuple[str, bytes]]:
    caption = f"caption of {key}"
    meta = json.dumps({"caption": caption, "key": key}).encode()
    return [(f"{key}.jpg", _jpeg(i)), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)]


def _keys(samples) -> list[str]:
    return [key.rsplit(":", 1)[1] for _, _, key in samples]


# --- the real shard --------------------------------------------------------------------------------------------------


@needs_real
def test_real_shard_all_samples_with_their_captions():
    with tarfile.open(REAL_SHARD) as tar:
        expected = {
            m.name[: -len(".txt")]: tar.extractfile(m).read().decode().strip() for m in tar if m.name.endswith(".txt")
        }
    assert len(expected) == 32
    reader = ShardSamples(str(REAL_SHARD))
    got = {key.rsplit(":", 1)[1]: (image, caption) for image, caption, key in reader}
    assert {k: c for k, (_, c) in got.items()} == expected
    assert all(im.mode == "RGB" and min(im.size) > 0 for im, _ in got.values())
    assert reader.faults.as_dict()["samples"] == 32 and reader.faults.skipped == 0


@needs_real
def test_pipe_url_and_json_field_on_real_shard():
    reader = ShardSamples(f"pipe:cat {REAL_SHARD}", caption="json:caption")
    with tarfile.open(REAL_SHARD) as tar:
        expected = {
            m.name[: -len(".json")]: json.loads(tar.extractfile(m).read())["caption"].strip()
            for m in tar
            if m.name.endswith(".json")
        }
    assert {key.rsplit(":", 1)[1]: c for _, c, key in reader} == expected


# --- faults ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def faulty_shards(tmp_path) -> list[str]:
    jpeg = _jpeg(7)
    a = _good("good0", 0)
    a += [("trunc.jpg", jpeg[: len(jpeg) // 2]), ("trunc.txt", b"a truncated jpeg")]
    a += [("notimg.jpg", b"<html><body>404 not found</body></html>"), ("notimg.txt", b"an html page")]
    a += [("nocap.jpg", jpeg), ("nocap.json", b'{"key": "nocap"}')]
    a += [("empty.jpg", jpeg), ("empty.txt", b"  \n")]
    a += _good("good1", 1)
    (tmp_path / "a.tar").write_bytes(_tar_bytes(a))
    # a shard cut off in the middle of the image of its last sample (good5)
    full = _tar_bytes(_good("good2", 2) + _good("good3", 3) + _good("good4", 4) + _good("good5", 5))
    with tarfile.open(fileobj=io.BytesIO(full)) as tar:
        member = tar.getmember("good5.jpg")
    (tmp_path / "cut.tar").write_bytes(full[: member.offset_data + member.size // 2])
    (tmp_path / "c.tar").write_bytes(_tar_bytes(_good("good6", 6)))
    return [str(tmp_path / n) for n in ("a.tar", "missing.tar", "cut.tar", "c.tar")]


def test_every_fault_is_skipped_and_counted_by_kind(faulty_shards, caplog):
    reader = ShardSamples(faulty_shards, min_samples=1000)
    with caplog.at_level(logging.WARNING, logger="aimv2.data.faults"):
        samples = list(reader)
    assert _keys(samples) == ["good0", "good1", "good2", "good3", "good4", "good6"]
    assert [c for _, c, _ in samples] == [f"caption of {k}" for k in _keys(samples)]
    assert reader.faults.counts == {
        "bad_image": 2,
        "no_caption": 1,
        "empty_caption": 1,
        "truncated_shard": 1,
        "unreadable_shard": 1,
    }
    assert reader.faults.first["unreadable_shard"].startswith(faulty_shards[1])
    assert reader.faults.first["truncated_shard"].startswith(faulty_shards[2])
    assert "trunc" in reader.faults.first["bad_image"]
    logged = caplog.text
    for kind in reader.faults.counts:
        assert f"skipped {kind}" in logged


def test_duplicate_member_is_dropped_and_counted(tmp_path):
    path = tmp_path / "dup.tar"
    path.write_bytes(_tar_bytes(_good("k0") + [("k0.txt", b"a second caption")] + _good("k1", 1)))
    reader = ShardSamples(str(path), min_samples=1000)
    assert [(k.rsplit(":", 1)[1], c) for _, c, k in reader] == [("k0", "caption of k0"), ("k1", "caption of k1")]
    assert reader.faults.counts == {"bad_member": 1} and "k0.txt" in reader.faults.first["bad_member"]


def test_one_tar_reader_loads_only_what_it_is_asked_and_spans_the_rest(faulty_shards, tmp_path):
    """The reader under every shard user: samples grouped per shard, shard faults counted once, members declined by
    read= left in the file as spans that read back the member's exact bytes."""
    faults = FaultCounter(max_rate=1.0)
    samples = list(shard_samples(faulty_shards, faults, read=lambda ext, size: ext == "txt"))
    assert [s["__key__"] for s in samples][:2] == ["good0", "trunc"] and samples[-1]["__key__"] == "good6"
    assert "good5" not in [s["__key__"] for s in samples]  # cut off inside its image: dropped, not half-read
    assert faults.counts == {"unreadable_shard": 1, "truncated_shard": 1} and faults.samples == 0
    first = samples[0]
    assert first["txt"] == b"caption of good0" and isinstance(first["jpg"], MemberSpan)
    assert first["jpg"].read() == _jpeg(0) and first["jpg"].url == faulty_shards[0]
    assert member_names(first) == "jpg, txt, json" and member_names({"__key__": "k"}) == "nothing"
    # everything loaded by default; a compressed shard streams, but cannot be spanned
    with gzip.open(tmp_path / "z.tar.gz", "wb") as f:
        f.write(_tar_bytes(_good("z0")))
    loaded = list(shard_samples([str(tmp_path / "z.tar.gz")], faults))
    assert [s["json"] for s in loaded] == [json.dumps({"caption": "caption of z0", "key": "z0"}).encode()]
    assert list(shard_samples([str(tmp_path / "z.tar.gz")], faults, read=lambda ext, size: True)) == []
    assert faults.counts["unreadable_shard"] == 2


def test_shard_captions_reads_captions_and_counts_the_rest(faulty_shards):
    faults = FaultCounter(max_rate=1.0)
    texts = list(shard_captions(faulty_shards, "txt", faults))
    assert texts[:3] == ["caption of good0", "a truncated jpeg", "an html page"]  # images are not decoded
    assert faults.counts == {"no_caption": 1, "empty_caption": 1, "unreadable_shard": 1, "truncated_shard": 1}
    assert faults.samples == len(texts) == 8


def test_skip_rate_above_threshold_raises(faulty_shards):
    reader = ShardSamples(faulty_shards, min_samples=4, max_fault_rate=0.2)
    with pytest.raises(FaultRateError, match="allowed"):
        list(reader)


def test_all_bad_input_raises_naming_first_shard_and_kind(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(_tar_bytes([("x.jpg", b"not a jpeg"), ("x.txt", b"caption"), ("y.jpg", b"nope"), ("y.txt", b"c")]))
    with pytest.raises(FaultRateError, match=r"bad\.tar.*bad_image"):
        list(ShardSamples([str(bad), str(tmp_path / "gone.tar")]))
    with pytest.raises(FaultRateError, match=r"gone\.tar.*unreadable_shard"):
        list(ShardSamples(str(tmp_path / "gone.tar")))
    notatar = tmp_path / "notatar.tar"
    notatar.write_text("just text\n" * 100)
    with pytest.raises(FaultRateError, match=r"notatar\.tar.*unreadable_shard"):
        list(ShardSamples(str(notatar)))


def test_wrong_caption_field_is_an_error_not_an_empty_epoch(tmp_path):
    write_synthetic_shards(tmp_path, 12, shard_size=5)
    with pytest.raises(FaultRateError, match=r"00000\.tar.*no_caption.*json:alt_text"):
        list(ShardSamples(str(tmp_path), caption="json:alt_text"))


def test_fault_counter_pickles_and_merges():
    a, b = FaultCounter(), FaultCounter()
    a.ok()
    a.fault("bad_image", "s0:k1")
    b.ok()
    b.ok()
    b.fault("bad_image", "s1:k9")
    b.fault("no_caption", "s1:k3")
    merged = pickle.loads(pickle.dumps(a)).merge(pickle.loads(pickle.dumps(b)))
    assert merged.as_dict()["samples"] == 3 and merged.skipped == 3
    assert merged.counts == {"bad_image": 2, "no_caption": 1} and merged.first["bad_image"] == "s0:k1"
    with pytest.raises(ValueError, match="unknown fault kind"):
        a.fault("gremlins", "x")


# --- splitting -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_shards(out, 41, shard_size=5, size=16)  # 9 shards, the last one short
    return out


@pytest.mark.parametrize("shuffle", [0, 7])
def test_ranks_and_workers_see_disjoint_samples_covering_the_set(synth_shards, shuffle):
    seen = []
    for rank in range(2):
        reader = ShardSamples(str(synth_shards), rank=rank, world_size=2, shuffle=shuffle, seed=3)
        for worker in range(2):
            seen.append(_keys(reader.samples(worker, 2)))
    assert all(seen), "every consumer gets data"
    flat = [k for part in seen for k in part]
    assert sorted(flat) == [f"{i:09d}" for i in range(41)]  # complete, and no key twice


def test_dataloader_workers_split_one_rank(synth_shards):
    rank1 = ShardSamples(str(synth_shards), rank=1, world_size=2)
    expected = sorted(_keys(rank1.samples(0, 2)) + _keys(rank1.samples(1, 2)))
    loader = DataLoader(rank1, batch_size=None, num_workers=2, collate_fn=lambda s: s[2])
    assert sorted(k.rsplit(":", 1)[1] for k in loader) == expected


def test_shuffle_is_deterministic_per_seed_and_epoch(synth_shards):
    def order(seed, epoch):
        reader = ShardSamples(str(synth_shards), shuffle=10, seed=seed)
        reader.set_epoch(epoch)
        return _keys(reader)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(0, 0))


def test_resampled_is_endless_and_seeded(synth_shards):
    def first(n, rank):
        reader = ShardSamples(str(synth_shards), resampled=True, rank=rank, world_size=2)
        it = iter(reader)
        return [next(it)[2] for _ in range(n)]

    a = first(60, 0)
    assert len(a) == 60 and a == first(60, 0) and a != first(60, 1)


@pytest.mark.parametrize("shuffle", [0, 6])
def test_resume_from_saved_positions_continues_each_consumer_exactly(faulty_shards, synth_shards, shuffle):
    urls = expand_urls(synth_shards) + faulty_shards  # faults inside the skipped part and after it

    def reader(**kw):
        return ShardSamples(urls, rank=1, world_size=2, shuffle=shuffle, seed=5, min_samples=1000, **kw)

    whole = {w: list(reader(with_position=True).samples(w, 2)) for w in range(2)}
    saved = {w: whole[w][2][3][2] for w in range(2)}  # each worker has handed out 3 samples
    assert all(p >= 3 for p in saved.values())
    resumed = reader(skip=saved, with_position=True)
    for w in range(2):
        rest = list(resumed.samples(w, 2))
        assert [s[2:] for s in rest] == [s[2:] for s in whole[w][3:]]
        assert [s[1] for s in rest] == [s[1] for s in whole[w][3:]]
    done = reader(skip={0: 10**6, 1: 10**6})  # resuming at the end of the pass: nothing left, and no error
    assert list(done.samples(0, 2)) == [] and list(done.samples(1, 2)) == []


def test_resume_position_counts_skipped_samples(faulty_shards):
    first = ShardSamples(faulty_shards, with_position=True, min_samples=1000)
    it = iter(first)
    assert [next(it)[2].rsplit(":", 1)[1] for _ in range(2)] == ["good0", "good1"]
    _, _, key, (rank, worker, position) = next(it)
    assert (key.rsplit(":", 1)[1], rank, worker, position) == ("good2", 0, 0, 7)  # 4 bad samples passed before good1
    resumed = ShardSamples(faulty_shards, skip={0: 6}, min_samples=1000)  # saved after good1
    assert _keys(resumed) == ["good2", "good3", "good4", "good6"]
    assert resumed.faults.counts == {"unreadable_shard": 1, "truncated_shard": 1}  # the bad samples were not re-read


# --- captions and URLs -----------------------------------------------------------------------------------------------


@pytest.fixture
def caption_shard(tmp_path) -> str:
    members = []
    for i in range(200):
        key = f"s{i:04d}"
        meta = {"caption": f"JSON {i}"}
        if i % 10:  # every tenth sample has no synthetic caption
            meta["synthetic_caption"] = f"SYN {i}"
        members += [
            (f"{key}.png", _png()),
            (f"{key}.txt", f"TXT {i}".encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
    path = tmp_path / "captions.tar"
    path.write_bytes(_tar_bytes(members))
    return str(path)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_json_field_and_probabilistic_caption_choice(caption_shard):
    assert all(c.startswith("JSON ") for _, c, _ in ShardSamples(caption_shard, caption="json:caption"))
    syn = [c for _, c, _ in ShardSamples(caption_shard, caption="json:synthetic_caption", min_samples=1000)]
    assert len(syn) == 180 and all(c.startswith("SYN ") for c in syn)

    spec = {"txt": 0.5, "json:synthetic_caption": 0.5}
    first = [c for _, c, _ in ShardSamples(caption_shard, caption=spec, seed=1)]
    kinds = Counter(c.split()[0] for c in first)
    assert len(first) == 200 and set(kinds) == {"TXT", "SYN"}
    assert 60 <= kinds["SYN"] <= 120, kinds  # ~half of the 180 samples that have one
    assert all(c == f"TXT {i}" for i, c in enumerate(first) if i % 10 == 0)  # missing field -> the other one
    # the choice belongs to the sample: same in another pass, with shuffling, and from the string form of the spec
    again = ShardSamples(caption_shard, caption="txt=0.5,json:synthetic_caption=0.5", seed=1, shuffle=50)
    assert {k: c for _, c, k in again} == {k: c for _, c, k in ShardSamples(caption_shard, caption=spec, seed=1)}
    other_seed = [c for _, c, _ in ShardSamples(caption_shard, caption=spec, seed=2)]
    assert other_seed != first


def test_transparent_png_is_composited_to_rgb(caption_shard):
    image, _, _ = next(iter(ShardSamples(caption_shard)))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_caption_spec_parsing():
    assert parse_caption_spec("txt") == {"txt": 1.0}
    assert parse_caption_spec("txt=1,json:alt=3") == {"txt": 0.25, "json:alt": 0.75}
    assert CaptionPicker({"json:caption": 2}).weights == {"json:caption": 1.0}
    for bad in ("", "txt=-1", "json:", "txt=0"):
        with pytest.raises(ValueError):
            parse_caption_spec(bad)


def test_expand_urls(tmp_path):
    assert expand_urls("d/data-{000..002}.tar") == ["d/data-000.tar", "d/data-001.tar", "d/data-002.tar"]
    assert expand_urls(["a.tar", "b-{0..1}.tar"]) == ["a.tar", "b-0.tar", "b-1.tar"]
    assert expand_urls("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    for name in ("b.tar", "a.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_urls(tmp_path) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(ValueError, match="no shards"):
        expand_urls(tmp_path / "notes.txt") and expand_urls([])


# --- the command line ------------------------------------------------------------------------------------------------


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_synth_then_inspect_round_trip(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "synth", str(out), "--n", "23", "--shard-size", "10", "--size", "32"]) == 0
    assert _last_json(capsys)["samples"] == 23
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    sheet = tmp_path / "sheet.png"
    args = ["data", "inspect", str(out / "{00000..00002}.tar"), "--sheet", str(sheet), "--img-size", "32"]
    assert main(args) == 0
    report = _last_json(capsys)
    assert report["samples"] == 23 and report["skipped"] == 0 and report["skipped_by_kind"] == {}
    assert report["image_width"]["max"] == 32 and report["caption_words"]["min"] > 0
    with Image.open(sheet) as im:
        assert im.size == (5 * 2 + 4 * 32, 5 * 2 + 4 * 32)  # 16 tiles of 32 px, 4 x 4, padding 2
    assert main(["data", "inspect", str(out), "--limit", "4"]) == 0
    assert _last_json(capsys)["samples"] == 4
    assert main(["data", "synth", str(out), "--n", "3"]) == 2  # refuses to overwrite
    assert "already holds" in capsys.readouterr().err


def test_cli_inspect_reports_faults_and_fails_on_all_bad(faulty_shards, tmp_path, capsys):
    assert main(["data", "inspect", *faulty_shards]) == 0
    report = _last_json(capsys)
    assert report["samples"] == 6 and report["skipped"] == 6
    assert report["skipped_by_kind"]["bad_image"] == 2 and report["skipped_by_kind"]["unreadable_shard"] == 1
    assert main(["data", "inspect", str(tmp_path / "nowhere.tar")]) == 2
    captured = capsys.readouterr()
    assert "nowhere.tar" in captured.err and json.loads(captured.out.splitlines()[-1])["samples"] == 0
