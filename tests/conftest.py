import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest on one thread (and shared cores make two threads slower still)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
