import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

import glm4v_ms  # noqa: E402

glm4v_ms.set_device("CPU")

# Parity figures recorded by tests: (case, stage) -> (relative error, max abs error). Printed at the end.
PARITY_FIGURES = {}


def record(case: str, stage: str, rel: float, mx: float) -> None:
    PARITY_FIGURES[(case, stage)] = (rel, mx)


def pytest_terminal_summary(terminalreporter):
    if not PARITY_FIGURES:
        return
    tr = terminalreporter
    tr.section("fp32 parity against transformers 4.57.6 (relative error ||a-b||/||b||, max abs)")
    for (case, stage), (rel, mx) in sorted(PARITY_FIGURES.items()):
        tr.write_line(f"{case:<28} {stage:<22} rel {rel:.2e}   max {mx:.2e}")


@pytest.fixture(scope="session")
def ref_models(tmp_path_factory):
    """Lazily built tiny reference models, shared by the session: name -> (folder, torch model)."""
    cache = {}

    def get(name: str, **kwargs):
        if name not in cache:
            from reference import build_reference

            folder = str(tmp_path_factory.mktemp(name))
            cache[name] = (folder, build_reference(folder, **kwargs))
        return cache[name]

    return get
