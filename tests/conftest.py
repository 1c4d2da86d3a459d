import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data folder {SHARED_DATA} is absent (it sits beside the repository in CI)")
    return SHARED_DATA


def one_thread_pool():
    """For a module-scoped fixture: one intra-op thread in this process, and `distributed.default_threads`
    reporting one core, so the stages (and their subprocesses' sums) use one thread; restored after."""
    from instructgpt import distributed

    before = torch.get_num_threads()
    patch = pytest.MonkeyPatch()
    patch.setattr(distributed, "default_threads", lambda: 1)
    torch.set_num_threads(1)
    yield
    patch.undo()
    torch.set_num_threads(before)
