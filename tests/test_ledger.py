"""The ledger on its own: rows recorded by submission ref, completed by the score, read back, shown."""
from __future__ import annotations

import threading

from pipeline.kaggle.ledger import COLUMNS, COMPLETE, ERROR, PENDING, format_ledger, read_ledger, record, with_score


def _row(ref, val="0.50000", status=PENDING):
    return {"time": "2026-11-23T10:00:00+00:00", "file": f"/s/c-{ref}.csv", "fingerprint": f"fp{ref}",
            "split_strategy": "group", "metric": "log_loss", "val_score": val, "status": status, "ref": ref,
            "description": "d"}


def test_a_row_is_replaced_by_its_ref_and_completed_with_the_difference(tmp_path):
    path = tmp_path / "ledger.csv"
    record(path, _row(1))
    record(path, _row(2, "0.40000"))
    record(path, with_score(_row(1), COMPLETE, 0.62, None))
    rows = read_ledger(path)
    assert [r["ref"] for r in rows] == ["2", "1"] and list(rows[0]) == COLUMNS
    assert rows[1]["status"] == COMPLETE and rows[1]["lb_score"] == "0.62000" and rows[1]["difference"] == "+0.12000"
    rejected = with_score(_row(3), ERROR, None, "wrong header")
    assert rejected["status"] == ERROR and rejected["error"] == "wrong header" and "difference" not in rejected


def test_two_writers_at_once_each_keep_their_row(tmp_path):
    path = tmp_path / "ledger.csv"
    threads = [threading.Thread(target=record, args=(path, _row(ref))) for ref in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(int(r["ref"]) for r in read_ledger(path)) == list(range(20))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_format_shows_split_validation_leaderboard_and_status(tmp_path):
    path = tmp_path / "ledger.csv"
    record(path, with_score(_row(1), COMPLETE, 0.62, None))
    record(path, with_score(_row(2), ERROR, None, "NaN"))
    table = format_ledger(read_ledger(path))
    lines = table.splitlines()
    assert lines[0].split() == ["time", "kind", "submitted", "split", "metric", "valid", "leaderboard", "lb", "-", "valid", "status"]
    assert "0.62000" in lines[1] and "+0.12000" in lines[1] and lines[1].endswith("complete")
    assert lines[2].endswith("error (NaN)") and " - " in lines[2]
    assert read_ledger(tmp_path / "absent.csv") == []
