"""Run the notebooks in this folder as tests (nbmake) when pytest collects docs/notebooks.

The plain `python -m pytest` (testpaths in pyproject.toml) collects them without `--nbmake`, so
that pytest still runs where nbmake is not installed (the notebooks are then not collected);
`pytest --nbmake docs/notebooks` works too.

A notebook runs as a reader runs it, not as the unit tests run: its kernel gets no
TRITON_INTERPRET (tests/conftest.py sets TRITON_INTERPRET=1 in the pytest process, and kernels
inherit its environment), so on a CPU the DP layers take the plain-PyTorch reference path, and
on a GPU the compiled Triton kernels. Its kernel also gets OMP_NUM_THREADS=1: it runs beside
the pytest-xdist workers, and oversubscribed OpenMP threads made a 30 s notebook take minutes
on a 2-core CI machine.
"""

import contextlib
import os

import pytest

KERNEL_ENV = {"TRITON_INTERPRET": None, "OMP_NUM_THREADS": "1"}  # None: unset


def pytest_collect_file(file_path, parent):
    config = parent.config
    if file_path.suffix != ".ipynb" or not config.pluginmanager.hasplugin("nbmake"):
        return None
    if config.getoption("nbmake", default=False):
        return None  # nbmake's own hook collects it
    from nbmake.pytest_items import NotebookFile

    return NotebookFile.from_parent(parent, path=file_path)


@contextlib.contextmanager
def _environment(changes):
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if not getattr(item, "nbmake", False):
        return (yield)
    with _environment(KERNEL_ENV):  # the kernel inherits os.environ when nbclient starts it
        return (yield)
