# The repo root on sys.path for the tests (scripts import model, weighting, ... as top-level modules).


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of many processes or long runs (skip with -m 'not slow')")
