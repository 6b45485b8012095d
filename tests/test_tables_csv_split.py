"""A CSV file larger than ``csv_block_bytes`` cut into byte ranges at line starts (data/tables.py, CsvOptions).

The reference is pyarrow's own streaming read of the whole file (``pyarrow.csv.open_csv``, types from the first
block), never our range reader: the ranges together must give its rows, values and types (quoted commas, CRLF,
a last line without newline, empty lines, a cut that falls inside a quoted value), refuse what it refuses, and
under ``--nproc`` (gloo, file rendezvous) give one process's rows, steps, vocab.json and metrics."""

from __future__ import annotations

import collections

import pytest

pa = pytest.importorskip("pyarrow")
pcsv = pytest.importorskip("pyarrow.csv")
pq = pytest.importorskip("pyarrow.parquet")

from polytask.data.tables import (  # noqa: E402
    ByteRange, CsvOptions, TableLoader, TableSchema, TableSource, build_vocabularies, count_ids, csv_ranges,
    vocabulary_units)
from polytask.errors import ConfigError, DataError  # noqa: E402
from test_tables_dist import _config, _run  # noqa: E402


def _whole(f, columns=None):
    """pyarrow's streaming read of the whole file (types fixed by its first 1 MiB block): the reference."""
    conv = pcsv.ConvertOptions(include_columns=columns) if columns else None
    with pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=1 << 20), convert_options=conv) as r:
        return r.read_all()


def _read_ranges(f, ranges, columns):
    from polytask.data.tables import _iter_file

    return pa.Table.from_batches([rb for r in ranges for rb in _iter_file(f, columns, 7, r)])


def _block_for(f, parts):
    """A block size that cuts the data after the header into ``parts`` nominal parts."""
    data = f.stat().st_size - len(f.read_bytes().split(b"\n", 1)[0]) - 1
    return -(-data // parts)


HEADER = b'id,name,x,note\r\n'
AWKWARD = (b'1,"a,b",1.5,plain\r\n'
           b'2,"c ""q"", d",2,"x,y,z"\r\n'
           b'\r\n'                                    # an empty line: skipped by pyarrow, and by every range
           b'3,,3,\r\n'
           b'4,"zz,zz,zz,zz,zz,zz,zz,zz",4,w\r\n'
           b'\r\n\r\n'
           b'5,e,5.25,"1,2"\r\n'
           b'6,"f,g",-6,v\r\n'
           b'7,h,7,u\r\n')


def test_every_block_size_on_crlf_empty_lines_and_a_last_line_without_newline(tmp_path):
    # some ranges hold nothing but empty lines, some end on the line without newline: each must read as pyarrow does
    f = tmp_path / "e.csv"
    f.write_bytes(HEADER + AWKWARD * 2 + b"\r\n\r\n\r\n\r\n8,i,8,t")
    want = _whole(f)
    blocks = 0
    for block in range(1, f.stat().st_size):
        ranges = csv_ranges(f, CsvOptions(block_bytes=block))
        blocks += ranges is not None and len(ranges) > 3
        assert _read_ranges(f, ranges or [None], want.column_names).equals(want), block
    assert blocks > 50


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5])
def test_ranges_give_the_rows_and_types_of_the_whole_read(tmp_path, parts):
    f = tmp_path / "a.csv"
    f.write_bytes(HEADER + AWKWARD * 3 + b"8,i,8,t")  # the last line has no newline
    want = _whole(f)
    assert want.num_rows == 22 and want.schema.field("id").type == pa.int64()
    ranges = csv_ranges(f, CsvOptions(block_bytes=_block_for(f, parts)))
    if parts == 1:
        assert ranges is None  # one range would be the whole file: read whole
        ranges = [None]
    else:
        assert len(ranges) == parts
        data = f.read_bytes()
        assert all(data[r.start - 1:r.start] == b"\n" for r in ranges)  # each starts a line
        assert [r.start for r in ranges[1:]] == [r.end for r in ranges[:-1]] and ranges[-1].end == len(data)
    got = _read_ranges(f, ranges, want.column_names)
    assert got.schema == want.schema and got.equals(want)


def test_every_block_size_gives_the_whole_read_and_a_cut_in_a_quoted_value_moves_to_the_line_end(tmp_path):
    f = tmp_path / "q.csv"
    f.write_bytes(b'k,v\n' + b''.join(b'%d,"%s"\n' % (i, b",".join([b"w%d" % i] * (i % 9 + 1))) for i in range(40)))
    want = _whole(f)
    data = f.read_bytes()
    inside = 0
    for block in range(8, len(data)):
        ranges = csv_ranges(f, CsvOptions(block_bytes=block)) or [None]
        assert _read_ranges(f, ranges, ["k", "v"]).equals(want), block
        if ranges[0] is not None:
            start, size = ranges[0].start, len(data)
            nominal = start + (size - start) // -(-(size - start) // block)  # the first nominal cut
            inside += data[:nominal].count(b'"') % 2 == 1 and ranges[1].start > nominal
    assert inside > 10  # many of those cuts fell inside a quoted value (with commas) and moved to its line's end


def test_a_range_of_only_integers_in_a_string_column_reads_strings(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("code,y\nx7,1\n" + "".join(f"{i},{i % 2}\n" for i in range(3000)))
    want = _whole(f)
    assert want.schema.field("code").type == pa.string()  # the first block holds "x7"
    ranges = csv_ranges(f, CsvOptions(block_bytes=2000))
    assert len(ranges) > 5
    # alone, pyarrow infers int64 for a later range: the file's type must be passed to it
    alone = pcsv.read_csv(pa.BufferReader(f.read_bytes()[ranges[-1].start:]),
                          read_options=pcsv.ReadOptions(column_names=["code", "y"]))
    assert alone.schema.field("code").type == pa.int64()
    got = _read_ranges(f, ranges, ["code", "y"])
    assert got.equals(want) and got.column("code")[-1].as_py() == "2999"


def test_a_value_the_first_block_type_cannot_hold_is_refused_as_by_the_whole_read(tmp_path):
    f = tmp_path / "late.csv"
    body = "".join(f"{i},{i % 2}\n" for i in range(200_000))  # > 1 MiB: the last line is beyond the first block
    f.write_text("n,y\n" + body + "abc,1\n")
    with pytest.raises(pa.ArrowInvalid, match="int64"):
        _whole(f)
    src = TableSource(f, TableSchema(dense=("n",), labels={"y": "y"}), csv=CsvOptions(block_bytes=1 << 18))
    assert len(src.units) > 4 and all(isinstance(u[1], ByteRange) for u in src.units)
    with pytest.raises(DataError, match=r"late\.csv \(bytes \d+-\d+\): cannot read \(column 'n'.*int64"):
        src.count_rows()
    last = len(src.units) - 1
    assert sum(src.count_rows(range(last))) > 0  # the ranges before the bad line read; its own range is refused
    with pytest.raises(DataError, match="int64"):
        src.count_rows([last])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The synthetic log with train as one CSV file (cut by a small csv_block_bytes), val and test one CSV each."""
    from polytask.train.tables import write_synthetic_splits

    root = tmp_path_factory.mktemp("big")
    parquet = write_synthetic_splits(root / "pq", 1500, row_group_rows=500)
    out = []
    for name, src in zip(("train", "val", "test"), parquet):
        pcsv.write_csv(pq.read_table(src), root / f"{name}.csv")
        out.append(root / f"{name}.csv")
    return out


def _schema():
    return TableSchema(dense=("price", "hour"), labels={"click": "click"})


def test_source_units_counts_and_vocabularies_equal_the_whole_file(big):
    train = big[0]
    block = train.stat().st_size // 6
    whole = TableSource(train, _schema(), batch_size=50)
    cut = TableSource(train, _schema(), batch_size=50, csv=CsvOptions(block_bytes=block))
    assert len(whole.units) == 1 and len(cut.units) in (6, 7)
    assert sum(cut.count_rows()) == whole.count_rows()[0] == _whole(train).num_rows
    assert torch_rows(cut) == torch_rows(whole)  # file order, no shuffle: the same rows in the same order
    by_workers = collections.Counter(torch_rows(TableLoader(cut, num_workers=2)))  # ranges dealt to 2 workers
    assert by_workers == collections.Counter(torch_rows(whole))
    units = vocabulary_units(train, ["user_id"], CsvOptions(block_bytes=block))
    assert sum(u[2] for u in units) == train.stat().st_size - len(train.read_bytes().split(b"\n", 1)[0]) - 1
    one = build_vocabularies(train, ["user_id", "item_id"], 2)
    shares = [count_ids(train, ["user_id"], 64, (r, 3), CsvOptions(block_bytes=block))["user_id"] for r in range(3)]
    assert all(s is not None for s in shares)  # each of 3 shares holds ranges of the one file
    by_hand = collections.Counter(_whole(train, ["user_id"]).column("user_id").to_pylist())
    got = collections.Counter()
    for s in shares:
        got.update(dict(zip(s["v"].to_pylist(), s["n"].to_pylist())))
    assert got == by_hand
    cut_vocab = build_vocabularies(train, ["user_id", "item_id"], 2, csv=CsvOptions(block_bytes=block))
    assert all(cut_vocab[c].values == one[c].values and len(one[c].values) > 10 for c in one)


def torch_rows(src):
    out = []
    for inputs, targets, mask in src:
        out += list(zip(map(tuple, inputs["dense"].tolist()), targets["click"].tolist(), mask["click"].tolist()))
    return out


def test_newlines_in_values_keeps_files_whole_and_reads_quoted_line_breaks(tmp_path):
    from polytask.train.tables import parse_params

    f = tmp_path / "n.csv"
    f.write_bytes(b"x,y,s\n" + b"".join(b'%d,%d,"line\nbreak %d"\n' % (i, i % 2, i) for i in range(300)))
    p = parse_params({"train": "a", "val": "b", "test": "c", "labels": {"y": "y"}, "dense": ["x"],
                      "csv_block_bytes": 512, "newlines_in_values": True})
    assert p.csv_options() == CsvOptions(512, True)
    src = TableSource(f, TableSchema(dense=("x",), keep=("s",), labels={"y": "y"}), csv=p.csv_options())
    assert src.units == [(0, None)]  # not cut, though larger than the block
    assert src.count_rows() == [300]
    assert csv_ranges(f, CsvOptions(512)) is not None  # without the key it would be cut (and break the values)
    with pytest.raises(ConfigError, match="data.params.csv_block_bytes"):
        parse_params({"train": "a", "val": "b", "test": "c", "labels": {"y": "y"}, "csv_block_bytes": 0})


def test_resume_mid_epoch_over_ranges_sees_each_row_once_and_a_changed_cut_is_refused(big):
    train = big[0]
    csv = CsvOptions(block_bytes=train.stat().st_size // 5)
    make = lambda c=csv: TableSource(train, _schema(), batch_size=32, shuffle_rows=200, seed=3, csv=c)  # noqa: E731
    full = torch_rows(make())
    loader = TableLoader(make())
    seen = []
    for k, (inputs, targets, mask) in enumerate(loader):
        seen += list(zip(map(tuple, inputs["dense"].tolist()), targets["click"].tolist(), mask["click"].tolist()))
        if k == 9:
            break
    state = loader.state_dict()
    assert state["units"] >= 5
    again = TableLoader(make())
    again.load_state_dict(state)
    for inputs, targets, mask in again:
        seen += list(zip(map(tuple, inputs["dense"].tolist()), targets["click"].tolist(), mask["click"].tolist()))
    assert seen == full  # the interrupted and resumed run: the uninterrupted epoch, row for row
    with pytest.raises(ConfigError, match="units"):
        TableLoader(make(CsvOptions(block_bytes=train.stat().st_size // 9))).load_state_dict(state)


def _one_big_file_config(big, tmp_path, parts):
    cfg = _config(big, tmp_path / "r")
    cfg["data"]["params"]["csv_block_bytes"] = big[0].stat().st_size // parts
    return cfg


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_one_big_csv_like_one_process(big, tmp_path, world):
    cfg = _one_big_file_config(big, tmp_path, 7)
    (one,) = _run(tmp_path, cfg, 1)
    many = _run(tmp_path, cfg, world)
    assert collections.Counter(r for res in many for r in res["rows"]) == collections.Counter(one["rows"])
    assert len(one["rows"]) == 2 * _whole(big[0]).num_rows
    assert len({tuple(res["steps"]) for res in many}) == 1
    assert all(res["rows"] for res in many)  # every rank trained on part of the one file
    # the vocabulary pass: each rank counted its own byte ranges of the one file, together all of them once
    counted = [res["counted"] for res in many]
    assert all(c and all(isinstance(part, tuple) and len(part) == 2 for _, part in c) for c in counted)
    assert sorted(u for c in counted for u in c) == sorted(one["counted"])
    read = [sum(part[1] - part[0] for _, part in c) for c in counted]
    assert max(read) < 0.6 * sum(read)  # no rank read most of the file (bytes read per rank, from the ranges)
    assert all(res["vocab_json"] == one["vocab_json"] for res in many)
    for res in many:
        for split_one, split_many in zip(one["metrics"], res["metrics"]):
            for task, m in split_one.items():
                for key, value in m.items():
                    assert split_many[task][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (task, key)


def test_two_ranks_on_a_fraction_split_of_one_big_csv_like_one_process(big, tmp_path):
    # the rows of each range counted after the split's filter, in shares; the parts' metrics equal one process's
    cfg = _one_big_file_config(big, tmp_path, 6)
    params = cfg["data"]["params"]
    for k in ("train", "val", "test"):
        del params[k]
    params.update(path=str(big[0]), split={"key": "user_id", "fractions": [0.7, 0.15, 0.15], "seed": 4})
    (one,) = _run(tmp_path, cfg, 1)
    two = _run(tmp_path, cfg, 2)
    assert collections.Counter(two[0]["rows"] + two[1]["rows"]) == collections.Counter(one["rows"])
    assert 0 < len(one["rows"]) < 2 * _whole(big[0]).num_rows and two[0]["steps"] == two[1]["steps"]
    assert two[0]["vocab_json"] == two[1]["vocab_json"] == one["vocab_json"]
    for res in two:
        for split_one, split_two in zip(one["metrics"], res["metrics"]):
            for task, m in split_one.items():
                for key, value in m.items():
                    assert split_two[task][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (task, key)


def test_polytask_train_nproc_2_on_one_big_csv_matches_one_process(big, tmp_path):
    # the CLI end to end (about 12 s): vocab.json byte for byte, and the untrained model (rank 0's initialisation,
    # broadcast) scores the same at epoch 0 on the ranges read by 1 and 2 processes
    from test_tables_dist import train_nproc

    runs, vocab = {}, {}
    for n in (1, 2):
        cfg = _config(big, tmp_path / f"n{n}")
        cfg["data"]["params"]["csv_block_bytes"] = big[0].stat().st_size // 5
        lines = train_nproc(cfg, tmp_path, n)
        runs[n] = [r for r in lines if r["epoch"] == 0]
        vocab[n] = (tmp_path / f"n{n}" / "vocab.json").read_bytes()
    assert vocab[1] == vocab[2]
    assert len(runs[1]) == len(runs[2]) > 0
    for a, b in zip(runs[1], runs[2]):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a, b)


def test_a_bom_header_is_cut_after_it_and_a_file_without_newline_line_ends_stays_whole(tmp_path):
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + HEADER + AWKWARD * 4)
    ranges = csv_ranges(bom, CsvOptions(block_bytes=100))
    assert ranges[0].start == 3 + len(HEADER) and len(ranges) > 2  # pyarrow drops the BOM: the header is line 1
    assert _read_ranges(bom, ranges, ["id", "name", "x", "note"]).equals(_whole(bom))
    cr = tmp_path / "cr.csv"  # old Mac line ends: pyarrow reads them, but no \n marks a line start
    cr.write_bytes(b"a,b\r" + b"".join(b"%d,%d\r" % (i, i) for i in range(100)))
    assert _whole(cr).num_rows == 100 and csv_ranges(cr, CsvOptions(block_bytes=50)) is None
    lead = tmp_path / "lead.csv"  # empty lines above the header (pyarrow skips them): not cut
    lead.write_bytes(b"\n\n" + HEADER + AWKWARD * 4)
    assert csv_ranges(lead, CsvOptions(block_bytes=100)) is None


def test_a_cut_through_a_value_with_a_line_break_names_the_range_and_the_key(tmp_path):
    f = tmp_path / "nl.csv"
    f.write_bytes(b"x,y,s\n" + b"".join(b'%d,%d,"a\nb,c,d"\n' % (i, i % 2) for i in range(200)))
    src = TableSource(f, TableSchema(dense=("x",), labels={"y": "y"}), csv=CsvOptions(block_bytes=300))
    assert len(src.units) > 5
    with pytest.raises(DataError, match=r"nl\.csv \(bytes \d+-\d+\): cannot read .*newlines_in_values: true"):
        src.count_rows()
    src = TableSource(f, TableSchema(dense=("x",), labels={"y": "y"}), csv=CsvOptions(300, newlines_in_values=True))
    assert src.count_rows() == [200]
