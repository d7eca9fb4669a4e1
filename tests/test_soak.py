"""The soak's 30-second version (benchmarks/soak.py; the 10-minute run's JSON is committed under
benchmarks/results/): the real `rellax serve` process under steady open-loop load must answer
everything, and leak neither memory, file descriptors, threads nor Redis connections."""

from __future__ import annotations

from service_support import tiny_bundle_path

from training.tables import table_rows


def test_thirty_seconds_at_seventy_percent_leaks_nothing() -> None:
    from benchmarks.soak import markdown, run

    result = run(tiny_bundle_path(), seconds=30, load_share=0.7, clients=4, capacity_s=5, window_s=6)
    windows = result["windows"]
    assert len(windows) >= 5 and result["requests"] > 100, result
    assert result["errors"] == 0 and result["shed"] == 0, result["statuses"]
    assert result["answered_rps"] >= 0.5 * result["offered_rps"]  # the load really ran
    # Leaks grow without bound; a warm-up allocation does not. The bounds are generous on purpose:
    # 30 s shows a leak of a request's worth per request, not a slow one (that is the 10-min run's).
    assert result["rss_growth_mb"] <= 64, windows
    assert result["fd_growth"] <= 4, windows
    # Threads over the run's second half: thread pools warm up lazily, later on a busy CPU (a run
    # beside another test job grew 9 threads over the 30 s, none alone); a leak grows throughout.
    assert result["thread_growth_second_half"] <= 4, windows
    assert result["max_redis_clients"] <= 16, windows  # a pool, not a connection per request
    assert result["max_sockets"] <= 64 + 16 + 2, windows  # the client pool + Redis + listeners
    assert table_rows(markdown(result))[0][0] == "at s"
