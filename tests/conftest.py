"""Shared test setup: the shipped offline data (assets/), tiny configs, the `slow` marker."""

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tiktoken reads its cache folder when an encoding is first loaded: point it at the shipped
# copy of GPT-2's BPE files before any test touches tiktoken (no network here).
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT / "assets" / "tiktoken_cache"))
SHAKESPEARE = ROOT / "assets" / "tinyshakespeare.txt"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s; excluded from the default run")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by `bench.py gpu`)")


def loopback_reachable() -> bool:
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            with socket.create_connection(listener.getsockname(), timeout=2):
                return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def loopback():
    """For tests that talk over 127.0.0.1 (gloo ranks, torchrun, the HTTP server). Where it is
    unreachable (`unshare -n` leaves the loopback interface down) they would wait minutes on a
    connection; they skip at once instead, saying why."""
    if not loopback_reachable():
        pytest.skip("127.0.0.1 is unreachable: the loopback interface is down (`ip link set lo up`)")


@pytest.fixture(scope="session")
def shakespeare_path():
    return SHAKESPEARE


@pytest.fixture
def tiny_config():
    from gpt import GPTConfig

    return GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


@pytest.fixture
def char_data(tmp_path, shakespeare_path):
    """shakespeare_char prepared from the first 100 KB of Tiny Shakespeare."""
    from data import prepare_dataset

    src = tmp_path / "shakespeare_100k.txt"
    src.write_text(shakespeare_path.read_text()[:100_000])
    return prepare_dataset("shakespeare_char", input=src, data_root=tmp_path / "data")
