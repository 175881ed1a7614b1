import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# Every property test is the same on every run and machine: examples derived from the
# test (derandomize), no example database carried between runs, and no per-example
# deadline and no too_slow health check (both time the machine: a loaded 2-core CI
# machine must not turn a slow example into a failure). A test's own @settings still
# overrides these fields.
settings.register_profile("riskpipe", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("riskpipe")

TEST_NOISE_KEY = "riskpipe-tests-public-noise-key-0123456789"


def pytest_configure(config):
    # Models and context indexes are cached per user; tests share one cache so the
    # demo model trains at most once per machine.
    os.environ.setdefault("RISKPIPE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "riskpipe-tests"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # One public noise key for every stage the tests run, in-process or as a subprocess
    # (inherited), so certificates are the same on every run; tests of the key itself
    # (tests/test_noise_key.py) set or remove it.
    os.environ["RISKPIPE_NOISE_KEY"] = TEST_NOISE_KEY


@pytest.fixture(scope="session")
def demo_model():
    from riskpipe.models import load_model

    return load_model("demo:digits")


@pytest.fixture(scope="session")
def digits_test():
    from riskpipe.models.digits import load_split

    return load_split("test")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and batches: one thread is faster than two on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for every test that needs one (tests/pgserver.py)."""
    from pgserver import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(postgres, request):
    """A fresh, empty database on the shared server; its postgresql:// URL."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    return postgres.create_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where a ledger test's ledger goes, once per backend: a SQLite file that does not
    exist yet, then an empty PostgreSQL database (its URL)."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two Ed25519 key pairs as the docs tell users to make them (openssl genpkey -algorithm
    ed25519): key.pem / pub.pem, and other.pem / other.pub.pem."""
    import subprocess

    d = tmp_path_factory.mktemp("keys")
    for key, pub in (("key.pem", "pub.pem"), ("other.pem", "other.pub.pem")):
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(d / key)], check=True)
        subprocess.run(["openssl", "pkey", "-in", str(d / key), "-pubout", "-out", str(d / pub)], check=True)
    return d
