"""POST /v1/embeddings (openai_api.py, served by serve.py --embeddings): the official openai client gets
rag.py's encoder vectors in both encodings and all four input shapes, with OpenAI's usage and list shape;
bad requests get 4xx JSON; serve.py's option hands the encoder to the server."""

import base64
import http.client
import json
import types

import numpy as np
import pytest
import torch

import gpt
import rag
import serve
import tokenizer
from test_openai_api import client, start  # noqa: F401  (client: the openai client fixture, on our server)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    tok = tokenizer.load_tokenizer(str(rag.TOKENIZER))
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path_factory.mktemp("enc") / "encoder" / "ckpt.pt"
    path.parent.mkdir()
    rag.Encoder(model, tok, str(rag.TOKENIZER)).save(path)
    return rag.Encoder.load(path)  # as serve.py loads it: its name is the folder's, "encoder"


@pytest.fixture(scope="module")
def server(encoder, loopback):
    srv = start(encoder.model, encoder.tok, max_num_seqs=1, model_name="gen", embedder=encoder)
    yield srv
    srv.close()


def post(server, body, path="/v1/embeddings"):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


TEXTS = ["Where was Fosvou Geltonbrem born?", "Fosvou Geltonbrem: born in Nenbrou, a mill town.", "x"]


def test_client_gets_the_encoders_vectors(client, encoder):
    want = encoder.vectors(TEXTS).numpy()
    for fmt in ("float", None):  # None: the client asks for base64 and decodes it with numpy
        r = client.embeddings.create(model="encoder", input=TEXTS, **({"encoding_format": fmt} if fmt else {}))
        assert r.object == "list" and r.model == "encoder" and [d.index for d in r.data] == [0, 1, 2]
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), want, rtol=0, atol=1e-6)
        n_tokens = sum(len(encoder.tok.encode(t)) for t in TEXTS)
        assert r.usage.prompt_tokens == r.usage.total_tokens == n_tokens
    one = client.embeddings.create(model="encoder", input=TEXTS[0])  # one string: one vector
    np.testing.assert_allclose(one.data[0].embedding, want[0], rtol=0, atol=1e-6)
    ids = [encoder.tok.encode(t) for t in TEXTS[:2]]  # token ids, one list or several
    np.testing.assert_allclose(client.embeddings.create(model="encoder", input=ids[0]).data[0].embedding, want[0],
                               rtol=0, atol=1e-6)
    r = client.embeddings.create(model="encoder", input=ids, dimensions=16)
    np.testing.assert_allclose([d.embedding for d in r.data], want[:2], rtol=0, atol=1e-6)
    assert {m.id for m in client.models.list().data} == {"gen", "encoder"}


def test_base64_is_little_endian_float32(server, encoder):
    status, body = post(server, {"model": "encoder", "input": "x", "encoding_format": "base64"})
    assert status == 200
    got = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(got, encoder.vectors(["x"]).numpy()[0])


@pytest.mark.parametrize("body,param", [
    ({"model": "encoder"}, "input"),
    ({"model": "encoder", "input": ""}, "input"),
    ({"model": "encoder", "input": []}, "input"),
    ({"model": "encoder", "input": ["a", 3]}, "input"),
    ({"model": "encoder", "input": [[1, 2], []]}, "input"),
    ({"model": "encoder", "input": [True]}, "input"),
    ({"model": "encoder", "input": ["a"] * 2049}, "input"),
    ({"model": "encoder", "input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "encoder", "input": "a", "dimensions": 8}, "dimensions"),
    ({"model": "encoder", "input": [[5, 10 ** 6]]}, None),  # ids outside the vocabulary
    ({"model": "encoder", "input": "word " * 40}, None),  # longer than the encoder's block of 32
])
def test_bad_requests_get_400(server, body, param):
    status, reply = post(server, body)
    assert status == 400 and reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    assert reply["error"]["message"]


def test_wrong_model_and_no_embedder_get_404(server, encoder, loopback):
    status, reply = post(server, {"model": "gen", "input": "a"})
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    srv = start(encoder.model, encoder.tok, max_num_seqs=1)
    try:
        status, reply = post(srv, {"model": "nanollm", "input": "a"})
        assert status == 404 and "--embeddings" in reply["error"]["message"]
    finally:
        srv.close()


def test_serve_cli_loads_the_encoder(encoder, tmp_path, monkeypatch):
    ckpt = tmp_path / "gen.pt"
    gpt.save_checkpoint(ckpt, encoder.model, encoder.spec)
    got = {}

    class Stopped:  # what main() needs of a server and its engine: it serves until Ctrl-C
        server_address = ("127.0.0.1", 0)
        engine = property(lambda self: self)
        blocks = types.SimpleNamespace(num_blocks=0, block_size=16)  # the engine's KV pool, as main prints it

        def serve_forever(self):  # main() runs it in a thread
            pass

        def loop(self):  # the engine's loop, which main() runs in its own thread until Ctrl-C
            raise KeyboardInterrupt

        def shutdown(self):
            pass

        def server_close(self):
            pass

        def stop(self):
            pass

    def fake_make_server(*args, **kwargs):
        got.update(kwargs)
        return Stopped()

    monkeypatch.setattr(serve, "make_server", fake_make_server)
    serve.main(["--ckpt", str(ckpt), "--device", "cpu", "--embeddings", str(encoder_path(encoder, tmp_path))])
    assert isinstance(got["embedder"], rag.Encoder)
    torch.testing.assert_close(got["embedder"].vectors(TEXTS), encoder.vectors(TEXTS))
    with pytest.raises(SystemExit, match="is not a rag.py encoder"):
        serve.main(["--ckpt", str(ckpt), "--device", "cpu", "--embeddings", str(ckpt)])


def encoder_path(encoder, tmp_path):
    path = tmp_path / "encoder" / "ckpt.pt"
    path.parent.mkdir()
    encoder.save(path)
    return path
