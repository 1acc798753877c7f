"""Test session settings."""

import pytest
import torch

# The tests run tiny models: a second intra-op thread only adds wake-up latency, and on a shared 2-core machine a
# spinning OpenMP thread that gets preempted made small-op tests up to 100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Back to one thread after every test: a CLI test runs with its own --threads, which is process-global."""
    yield
    torch.set_num_threads(1)
