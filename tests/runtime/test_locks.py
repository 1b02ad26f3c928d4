"""The file lock that keeps two workers from doing the same long work at once."""

from __future__ import annotations

import threading

from icldistill.runtime.locks import exclusive


def test_a_second_holder_waits_until_the_first_releases(tmp_path, caplog):
    path, events = tmp_path / "sub" / "work.lock", []
    first_in, release = threading.Event(), threading.Event()

    def first() -> None:
        with exclusive(path, "doing the work"):
            events.append("first in")
            first_in.set()
            release.wait(10)
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(10)
    threading.Timer(0.3, release.set).start()
    with caplog.at_level("INFO", logger="icldistill.runtime.locks"), exclusive(path, "doing the work"):
        events.append("second in")
    thread.join()
    assert events == ["first in", "first out", "second in"]
    assert any("another process is doing the work" in r.getMessage() and str(path) in r.getMessage()
               for r in caplog.records)


def test_the_lock_is_free_again_after_an_error(tmp_path, caplog):
    path = tmp_path / "work.lock"
    try:
        with exclusive(path, "failing"):
            raise RuntimeError("the work failed")
    except RuntimeError:
        pass
    with caplog.at_level("INFO", logger="icldistill.runtime.locks"), exclusive(path, "retrying"):
        pass
    assert not caplog.records  # taken at once: nobody held it, so it never waited
