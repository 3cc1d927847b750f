"""The example scripts' data pipeline: reading, loss masks, packing and exact resume."""
import json

import numpy as np
import pytest

from examples.data import Batches, DataError, read_documents, tokenize


def _bytes(text):
    return list(text.encode())


def test_text_and_jsonl_and_completion_mask(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world")
    assert read_documents(txt) == [("", "hello world")]
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"prompt": "Q:", "completion": "A"}) + "\n\n" +
                  json.dumps({"text": "xy"}) + "\n")
    docs = read_documents(jl)
    ids, w = tokenize(docs, _bytes, eos_id=0)
    assert ids.tolist() == [ord("Q"), ord(":"), ord("A"), 0, ord("x"), ord("y"), 0]
    assert w.tolist() == [0, 0, 1, 1, 1, 1, 1]     # no loss on the prompt


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_documents(bad)
    with pytest.raises(DataError, match="too few"):
        Batches(np.arange(10, dtype=np.int32), np.ones(10, np.float32), batch=4, seq_len=8)


def test_batches_shift_and_resume():
    ids = np.arange(1000, dtype=np.int32)
    b = Batches(ids, np.ones(1000, np.float32), batch=3, seq_len=16, seed=1)
    first = [next(b) for _ in range(40)]          # crosses several epochs
    np.testing.assert_array_equal(first[0]["targets"][:, :-1], first[0]["inputs"][:, 1:])
    resumed = Batches(ids, np.ones(1000, np.float32), batch=3, seq_len=16, seed=1, position=25)
    for i in range(25, 40):
        np.testing.assert_array_equal(next(resumed)["inputs"], first[i]["inputs"])


def test_each_epoch_cuts_rows_at_a_new_offset():
    """Epoch 0 cuts at 0; later epochs at a seeded random offset, so a token does not sit at the
    same position of the same window every epoch; rows stay contiguous slices of the stream."""
    ids = np.arange(1000, dtype=np.int32)
    b = Batches(ids, np.ones(1000, np.float32), batch=4, seq_len=16, seed=3)
    starts = {e: {int(row[0]) % 16 for i in range(b.per_epoch)
                  for row in b.batch_at(e * b.per_epoch + i)["inputs"]} for e in range(4)}
    assert starts[0] == {0} and all(len(s) == 1 for s in starts.values())
    assert len(set.union(*starts.values())) > 1
    for e in range(4):
        rows = b.batch_at(e * b.per_epoch)["inputs"]
        assert np.all(np.diff(rows, axis=1) == 1) and rows.max() < 1000
    fixed = Batches(ids, np.ones(1000, np.float32), batch=4, seq_len=16, shift_each_epoch=False)
    assert fixed.n_rows == 62 and b.n_rows == 61
