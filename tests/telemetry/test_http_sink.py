"""HttpSink against a real local HTTP server: delivery, retries, 413/429/401, spool, replay."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from qabuse_dagster.telemetry.http_sink import HttpSink
from qabuse_dagster.telemetry.sinks import Sink

TOKEN = "tok-3f9a1c"

#: (status, headers, body) the scripted collector answers with.
Reply = tuple[int, dict[str, str], bytes]
#: Decides a reply from the batch received and how many requests came before it.
Behaviour = Callable[[list[dict[str, Any]], int], Reply]


def accept(batch: list[dict[str, Any]], _n: int) -> Reply:
    body = {"accepted": len(batch), "duplicates": 0, "rejected": []}
    return 200, {}, json.dumps(body).encode()


class Collector:
    """A ThreadingHTTPServer on 127.0.0.1 that logs every POST and replies as scripted."""

    def __init__(self, behaviour: Behaviour = accept, port: int = 0) -> None:
        self.behaviour = behaviour
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                batch = json.loads(body)
                request = {"path": self.path, "headers": dict(self.headers), "batch": batch}
                with collector._lock:
                    n = len(collector.requests)
                    collector.requests.append(request)
                status, headers, reply = collector.behaviour(batch, n)
                request["status"] = status
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sink timed out and hung up first

            def log_message(self, *args: Any) -> None:
                """Keep test output quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def received(self) -> list[str]:
        """Job ids of every record received, in order, duplicates kept."""
        return [r["job_id"] for req in self.requests for r in req["batch"]]

    def accepted(self) -> list[str]:
        """Job ids of the records in batches answered 200, in order, duplicates kept."""
        return [r["job_id"] for req in self.requests if req["status"] == 200 for r in req["batch"]]


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    yield server
    server.stop()


def records(n: int, prefix: str = "job") -> list[dict[str, Any]]:
    return [{"job_id": f"{prefix}-{i}", "status": "submitted", "shots": i} for i in range(n)]


def make_sink(url: str, spool_dir: Path, **kwargs: Any) -> HttpSink:
    options: dict[str, Any] = {
        "spool_dir": spool_dir,
        "timeout_s": 2.0,
        "max_retries": 2,
        "backoff_s": 0.01,
        "max_backoff_s": 0.05,
    }
    options.update(kwargs)
    return HttpSink(url, TOKEN, **options)


def spool_files(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("spool-*.jsonl"))


def dead_url() -> str:
    """The url of a port nothing listens on any more."""
    server = Collector()
    server.stop()
    return server.url


def test_happy_path_delivers_every_record_with_bearer_and_json_array(
    collector: Collector, tmp_path: Path
) -> None:
    sink = make_sink(collector.url, tmp_path, batch_size=4)
    assert isinstance(sink, Sink)
    sent = records(10)
    sink.write(sent)
    sink.close()

    assert [len(r["batch"]) for r in collector.requests] == [4, 4, 2]
    for request in collector.requests:
        assert request["path"] == "/v1/telemetry"
        assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
        assert request["headers"]["Content-Type"] == "application/json"
        assert isinstance(request["batch"], list)
    assert [r for req in collector.requests for r in req["batch"]] == sent
    assert sink.stats == {
        "sent": 10,
        "replayed": 0,
        "rejected": 0,
        "spooled": 0,
        "dropped": 0,
        "duplicates": 0,
    }
    assert not list(tmp_path.iterdir())


def test_base_url_path_is_kept(tmp_path: Path) -> None:
    server = Collector()
    try:
        sink = make_sink(server.url + "/collector/", tmp_path)
        sink.write(records(1))
        assert server.requests[0]["path"] == "/collector/v1/telemetry"
    finally:
        server.stop()


def test_5xx_then_success_is_retried(collector: Collector, tmp_path: Path) -> None:
    def flaky(batch: list[dict[str, Any]], n: int) -> Reply:
        return (503, {}, b"busy") if n < 2 else accept(batch, n)

    collector.behaviour = flaky
    sink = make_sink(collector.url, tmp_path)
    sink.write(records(3))

    assert len(collector.requests) == 3
    assert sink.sent == 3 and sink.spooled == 0
    assert not spool_files(tmp_path)


def test_rejected_records_in_a_200_answer_are_counted_not_retried(
    collector: Collector, tmp_path: Path
) -> None:
    def picky(batch: list[dict[str, Any]], _n: int) -> Reply:
        body = {
            "accepted": len(batch) - 2,
            "duplicates": 1,
            "rejected": [{"index": 0, "errors": ["bad"]}, {"index": 3, "errors": ["bad"]}],
        }
        return 200, {}, json.dumps(body).encode()

    collector.behaviour = picky
    sink = make_sink(collector.url, tmp_path)
    sink.write(records(5))

    assert len(collector.requests) == 1
    assert (sink.sent, sink.rejected, sink.duplicates, sink.spooled) == (3, 2, 1, 0)


def test_rejections_beyond_the_detailed_ones_are_counted_from_the_total(
    collector: Collector, tmp_path: Path
) -> None:
    # The collector details the first rejections only and counts them all in rejected_total.
    def bounded(batch: list[dict[str, Any]], _n: int) -> Reply:
        body = {
            "accepted": 1,
            "duplicates": 0,
            "rejected": [{"index": 0, "errors": [["shots", "bad"]]}],
            "rejected_total": len(batch) - 1,
        }
        return 200, {}, json.dumps(body).encode()

    collector.behaviour = bounded
    sink = make_sink(collector.url, tmp_path)
    sink.write(records(6))

    assert (sink.sent, sink.rejected, sink.spooled) == (1, 5, 0)


def test_server_down_spools_then_flush_replays_exactly_once(tmp_path: Path) -> None:
    url = dead_url()
    sink = make_sink(url, tmp_path, batch_size=3)
    first, second = records(7, "a"), records(2, "b")
    sink.write(first)
    sink.write(second)

    assert sink.spooled == 9 and sink.sent == 0
    spooled_batches = [
        json.loads(line)
        for path in spool_files(tmp_path)
        for line in path.read_text().split("\n")
        if line
    ]
    assert [r for batch in spooled_batches for r in batch] == first + second
    assert all(len(batch) <= 3 for batch in spooled_batches)

    port = int(url.rsplit(":", 1)[1])
    server = Collector(port=port)
    try:
        sink.flush()
        assert server.received() == [r["job_id"] for r in first + second]
        assert sink.replayed == 9
        assert not list(tmp_path.iterdir())  # spool and progress files gone
        sink.flush()  # nothing left: nothing sent again
        assert len(server.received()) == 9
    finally:
        server.stop()
        sink.close()


def test_spool_survives_a_restart_and_is_replayed_first(tmp_path: Path) -> None:
    url = dead_url()
    before = make_sink(url, tmp_path)
    before.write(records(4, "old"))
    before.close()
    assert before.spooled == 4 and spool_files(tmp_path)

    server = Collector(port=int(url.rsplit(":", 1)[1]))
    try:
        after = make_sink(url, tmp_path)
        after.write(records(2, "new"))  # replays the spool before sending its own records
        assert server.received() == ["old-0", "old-1", "old-2", "old-3", "new-0", "new-1"]
        assert (after.replayed, after.sent) == (4, 2)
        assert not spool_files(tmp_path)
        after.close()
    finally:
        server.stop()


def test_a_replay_cut_short_resumes_without_resending(collector: Collector, tmp_path: Path) -> None:
    down = make_sink(dead_url(), tmp_path, batch_size=2)
    down.write(records(6))  # three spooled batches in one file
    down.close()
    assert len(spool_files(tmp_path)) == 1

    def once_then_down(batch: list[dict[str, Any]], n: int) -> Reply:
        return accept(batch, n) if n == 0 else (500, {}, b"")

    collector.behaviour = once_then_down
    sink = make_sink(collector.url, tmp_path, batch_size=2)
    sink.flush()
    assert sink.replayed == 2
    assert spool_files(tmp_path)  # kept: not every batch answered

    collector.behaviour = accept
    sink.flush()
    # each accepted exactly once, in order
    assert collector.accepted() == [f"job-{i}" for i in range(6)]
    assert sink.replayed == 6
    assert not list(tmp_path.iterdir())


def test_a_file_another_sink_is_writing_is_left_to_it(tmp_path: Path) -> None:
    url = dead_url()
    writer = make_sink(url, tmp_path)
    writer.write(records(2, "w"))  # its spool file stays open and locked
    assert spool_files(tmp_path)

    server = Collector(port=int(url.rsplit(":", 1)[1]))
    try:
        other = make_sink(url, tmp_path)
        other.flush()
        assert server.received() == [] and spool_files(tmp_path)
        other.close()

        writer.flush()  # the writer lets go of its file and replays it
        assert server.accepted() == ["w-0", "w-1"]
        assert not spool_files(tmp_path)
        writer.close()
    finally:
        server.stop()


def test_a_torn_last_line_is_discarded_and_the_rest_replayed(
    collector: Collector, tmp_path: Path
) -> None:
    good = json.dumps(records(2)) + "\n"
    (tmp_path / "spool-00000000000000000001-1-abcd.jsonl").write_text(good + '[{"job_id": "x')
    sink = make_sink(collector.url, tmp_path)
    sink.flush()

    assert collector.accepted() == ["job-0", "job-1"]
    assert not list(tmp_path.iterdir())


def test_429_waits_for_retry_after(collector: Collector, tmp_path: Path) -> None:
    def limited(batch: list[dict[str, Any]], n: int) -> Reply:
        return (429, {"Retry-After": "1"}, b"") if n == 0 else accept(batch, n)

    collector.behaviour = limited
    sink = make_sink(collector.url, tmp_path)
    started = time.monotonic()
    sink.write(records(2))
    elapsed = time.monotonic() - started

    assert elapsed >= 0.9
    assert len(collector.requests) == 2 and sink.sent == 2


def test_429_wait_is_capped(collector: Collector, tmp_path: Path) -> None:
    def limited(batch: list[dict[str, Any]], n: int) -> Reply:
        return (429, {"Retry-After": "3600"}, b"") if n == 0 else accept(batch, n)

    collector.behaviour = limited
    sink = make_sink(collector.url, tmp_path, max_retry_after_s=0.1)
    started = time.monotonic()
    sink.write(records(2))

    assert time.monotonic() - started < 5
    assert sink.sent == 2


def test_413_halves_the_batch_until_it_fits(collector: Collector, tmp_path: Path) -> None:
    def small_bodies(batch: list[dict[str, Any]], n: int) -> Reply:
        too_big = len(batch) > 3 or any(r["job_id"] == "job-6" for r in batch)
        return (413, {}, b"") if too_big else accept(batch, n)

    collector.behaviour = small_bodies
    sink = make_sink(collector.url, tmp_path, batch_size=10)
    sink.write(records(10))

    assert collector.accepted() == [f"job-{i}" for i in range(10) if i != 6]
    assert all(len(req["batch"]) <= 3 for req in collector.requests if req["status"] == 200)
    assert (sink.sent, sink.rejected, sink.spooled) == (9, 1, 0)  # job-6 alone is too large


@pytest.mark.parametrize("status", [401, 403, 400])
def test_refused_batches_are_rejected_not_spooled(
    collector: Collector, tmp_path: Path, status: int
) -> None:
    collector.behaviour = lambda batch, n: (status, {}, b'{"error": "no"}')
    sink = make_sink(collector.url, tmp_path)
    sink.write(records(3))
    sink.write(records(2))
    sink.close()

    assert len(collector.requests) == 2  # not retried
    assert (sink.rejected, sink.sent, sink.spooled) == (5, 0, 0)
    assert not list(tmp_path.iterdir())


def test_full_spool_drops_the_newest_and_keeps_the_oldest(tmp_path: Path) -> None:
    sink = make_sink(dead_url(), tmp_path, batch_size=5, max_retries=0, max_spool_bytes=600)
    sink.write(records(5, "old"))
    kept = b"".join(p.read_bytes() for p in spool_files(tmp_path))
    sink.write(records(20, "new"))

    assert sink.spooled + sink.dropped == 25
    assert sink.dropped > 0
    on_disk = b"".join(p.read_bytes() for p in spool_files(tmp_path))
    assert on_disk.startswith(kept) and len(on_disk) <= 600
    sink.close()


def test_garbage_answers_and_timeouts_never_raise(collector: Collector, tmp_path: Path) -> None:
    def odd(batch: list[dict[str, Any]], n: int) -> Reply:
        if n == 0:
            return 200, {}, b"not json"
        if n == 1:
            return 200, {}, b'{"rejected": "nope"}'
        if n == 2:
            return 302, {"Location": "/elsewhere"}, b""
        time.sleep(0.5)  # slower than the sink's timeout
        return accept(batch, n)

    collector.behaviour = odd
    sink = make_sink(collector.url, tmp_path, timeout_s=0.2, max_retries=1)
    for _ in range(4):
        sink.write(records(1))

    assert (sink.sent, sink.rejected, sink.spooled) == (2, 1, 1)


def test_write_after_close_is_a_programming_error(collector: Collector, tmp_path: Path) -> None:
    sink = make_sink(collector.url, tmp_path)
    sink.close()
    sink.close()
    with pytest.raises(ValueError):
        sink.write(records(1))


def test_bad_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        HttpSink("ftp://collector", TOKEN, spool_dir=tmp_path)
