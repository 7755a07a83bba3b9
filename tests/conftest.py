"""Shared fixtures."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny inputs gain nothing from intra-op threads, and on a shared 2-core box the spinning
    threads cost 10x; restored after the module. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- running on every core (pytest-xdist, ``-n auto``) -----------------------------------------
#
# These files share something costly among their tests: one subprocess run (the two-process
# launch, the Triton interpreter run: 20-35 s each) or one import (transformers, Lightning:
# ~3 s each, imported when their tests run). Their tests go to one worker together, and first,
# so it happens once and not at the tail of the session. (xdist's own ``--dist loadgroup``
# does the grouping with a node-id suffix that pytest 9.2 no longer keeps.)
ONE_WORKER_FILES = ("tests/test_distributed.py", "tests/test_triton_interpret.py", "tests/test_hf_trainer.py",
                    "tests/test_schedule_lightning.py")


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(items: list) -> None:
    """The shared-run files first (a stable sort: the same order on every worker)."""
    items.sort(key=lambda item: _file_of(item.nodeid) not in ONE_WORKER_FILES)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """For the default ``--dist load``: each of `ONE_WORKER_FILES` is one unit of work (all its
    tests on one worker), every other test its own unit, as in xdist's ``loadgroup``."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerFiles(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _file_of(nodeid) if _file_of(nodeid) in ONE_WORKER_FILES else nodeid

    return OneWorkerFiles(config, log)


@pytest.fixture(scope="session", autouse=True)
def _threads_per_worker():
    """Under pytest-xdist every worker gets its share of the cores for torch's intra-op
    threads (one each on a 2-core machine with ``-n auto``), and so do the processes a test
    starts (``OMP_NUM_THREADS``): workers that each spin up a thread per core fight over the
    cores and the suite runs slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers <= 1:
        yield
        return
    n, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    share = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(share)
    os.environ["OMP_NUM_THREADS"] = str(share)
    yield
    torch.set_num_threads(n)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env
