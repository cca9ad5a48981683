import os


def pytest_configure(config):
    # With --benchmark-disable each benchmark runs once as a smoke test: use the small sizes.
    if config.getoption("benchmark_disable", default=False):
        os.environ.setdefault("RCPS_BENCH_SMALL", "1")
