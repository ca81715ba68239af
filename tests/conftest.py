"""Shared test setup: the shipped offline data (assets/), tiny configs, the `slow` marker, the
byte-level BPE tokenizers that test_bpe.py and test_tokenizer.py check against tiktoken."""

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one process per core, so one thread each
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT / "assets" / "tinyshakespeare.txt"


def seed_tiktoken_cache():
    """tiktoken.get_encoding("gpt2"), the tests' reference, reads GPT-2's files from tiktoken's
    cache, named there by the sha1 of their URLs as in assets/tiktoken_cache: copy the shipped
    files into a cache outside the work tree (tiktoken also caches other files there, named by
    the sha1 of their paths: in assets/ they would be litter), so no test needs the network."""
    cache = os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(tempfile.gettempdir()) / "nanollm-tiktoken"))
    if not cache:  # "" turns tiktoken's cache off
        return
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for src in (ROOT / "assets" / "tiktoken_cache").iterdir():
        if not (cache / src.name).exists():
            tmp = cache / f".{src.name}.{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, cache / src.name)  # whole or not at all: pytest runs may start together


seed_tiktoken_cache()


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


@pytest.fixture(scope="session")
def tiktoken_gpt2():
    """tiktoken's own GPT-2 encoding (from tiktoken's cache, seeded above): the reference."""
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is the reference for GPT-2 tokenization")
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def gpt2():
    """GPT-2's merges as a bpe.Tokenizer, read from OpenAI's files (shipped in assets/)."""
    import tokenizer

    return tokenizer.bpe_from_gpt2_files(tokenizer.GPT2_VOCAB_BPE, tokenizer.GPT2_ENCODER_JSON)


@pytest.fixture(scope="session")
def small():
    """A 512-token tokenizer trained on 100 KB of Shakespeare, with <|endoftext|>."""
    import bpe

    vocab, merges = bpe.train_bpe(SHAKESPEARE.read_text(encoding="utf-8")[:100_000], 512, special_tokens=(bpe.ENDOFTEXT,))
    return bpe.Tokenizer(vocab, merges, (bpe.ENDOFTEXT,))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and on a busy 2-core machine OpenMP's second thread
    is a straggler; the setting is restored for the other tests. Use it per file with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def browser():
    """Headless Chromium driven by selenium (a skip that says what to install where either is missing)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (pip install selenium) drives the browser")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()
