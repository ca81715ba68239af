"""rag.py: chunk offsets, BM25 == bm25s, incremental add == rebuild, IVF recall against faiss's exact
search, fusion, the encoder's pooling and InfoNCE, the metrics, the shipped QA set, the CLI's one-line
errors and --help, and (slow) the figures of the issue on the shipped test questions."""

import dataclasses
import importlib.util
import json
import math
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import gpt
import rag
import tokenizer
from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one query at a time


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer(str(rag.TOKENIZER))


def zipf_corpus(seed, n_docs, vocab=400):
    """A hidden-style corpus: Zipf-distributed words (few frequent, many rare), lengths 1..60."""
    rng = random.Random(seed)
    words = [f"t{i}" for i in range(vocab)]
    weights = [1 / (i + 1) for i in range(vocab)]
    return [rng.choices(words, weights, k=rng.randint(1, 60)) for _ in range(n_docs)]


# ----------------------------------------------------------------------------------------
# Chunking


def test_chunks_keep_exact_offsets_overlap_and_whole_words(tok):
    text = rag.DOCS.read_text().splitlines()[7]
    doc = json.loads(text)
    count = lambda w: len(tok.encode(w))  # noqa: E731
    spans = rag.chunk_spans(doc["text"], count, 24, 6)
    assert len(spans) >= 3 and spans[0][0] == 0 and spans[-1][1] == len(doc["text"].rstrip())
    for (s, e), (s2, _) in zip(spans, spans[1:]):
        assert s < s2 < e  # they overlap, and always move forward
        assert 0 < len(tok.encode(" " + doc["text"][s2:e])) <= 6  # at most `overlap` tokens repeated
    for s, e in spans:
        piece = doc["text"][s:e]
        in_running_text = piece if s == 0 else " " + piece  # as counted: each word with the space before it
        assert piece == piece.strip() and len(tok.encode(in_running_text)) <= 24
        assert (s == 0 or doc["text"][s - 1] == " ") and (e == len(doc["text"]) or doc["text"][e] == " ")
    covered = set().union(*(range(s, e) for s, e in spans))
    assert all(i in covered for i, ch in enumerate(doc["text"]) if ch != " ")
    # a word longer than a chunk is a chunk of its own, not an endless loop
    assert rag.chunk_spans("a " + "x" * 50 + " b", lambda w: len(w.strip()), 10, 3) == [(0, 1), (2, 52), (53, 54)]


def test_chunks_from_jsonl_and_text_files(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text('{"id": "x", "title": "T", "text": "one two three"}\n\n{"text": "four"}\n')
    (tmp_path / "notes.txt").write_text("five six")
    docs = list(rag.read_docs([tmp_path / "a.jsonl", tmp_path / "notes.txt"]))
    n1 = len('{"id": "x", "title": "T", "text": "one two three"}\n\n')
    assert docs == [("x", "T", "one two three", 0), (f"{tmp_path / 'a.jsonl'}:3", "", "four", n1),
                    (str(tmp_path / "notes.txt"), "notes", "five six", n1 + len('{"text": "four"}\n'))]
    chunks = list(rag.chunk_docs(docs, tok, 32, 8))
    assert [c.passage() for c in chunks] == ["T: one two three", "four", "notes: five six"]
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(common.NanoError, match="line 1 needs a string field 'text'"):
        list(rag.read_docs([tmp_path / "bad.jsonl"]))


# ----------------------------------------------------------------------------------------
# BM25


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (0.9, 0.4), (2.0, 1.0)])
def test_bm25_scores_equal_bm25s(k1, b):
    bm25s = pytest.importorskip("bm25s")  # requirements-dev.txt
    corpus = zipf_corpus(0, 800)
    reference = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64")  # bm25s's default method
    reference.index(corpus, show_progress=False)
    ours = rag.BM25(k1, b)
    ours.add(corpus)
    rng = random.Random(1)
    for query in [rng.choices(sorted(set(sum(corpus, []))), k=rng.randint(1, 6)) for _ in range(30)] + [["t1", "t1"]]:
        np.testing.assert_allclose(ours.scores(query + ["never-seen"]), reference.get_scores(query), rtol=0, atol=1e-6)


def test_bm25_add_equals_rebuild():
    corpus = zipf_corpus(2, 300)
    whole, parts = rag.BM25(), rag.BM25()
    whole.add(corpus)
    for s in range(0, 300, 70):
        parts.add(corpus[s:s + 70])
        parts.scores(["t3"])  # a search between two adds must not leave stale postings
    for query in (["t0", "t5"], ["t17", "t399", "t2"], ["t250"]):
        np.testing.assert_array_equal(parts.scores(query), whole.scores(query))
    state = rag.BM25.from_state(parts.state())
    np.testing.assert_array_equal(state.scores(["t5", "t9"]), whole.scores(["t5", "t9"]))


def test_index_add_equals_rebuild_through_the_cli(tmp_path, tiny_model, tok):
    lines = rag.DOCS.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[40:70]) + "\n")
    rag.Encoder(tiny_model, tok, str(rag.TOKENIZER)).save(tmp_path / "enc.pt")
    encoder = ["--encoder", str(tmp_path / "enc.pt")]
    rag.main(["index", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "whole"), *encoder])
    rag.main(["index", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "grown"), *encoder])
    rag.main(["index", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "grown"), "--add"])
    whole, grown = rag.Index.load(tmp_path / "whole"), rag.Index.load(tmp_path / "grown")
    assert len(whole) == len(grown) > 100
    assert whole.chunks(range(len(whole))) == grown.chunks(range(len(grown)))
    for q in ("Where was Fosvou Geltonbrem born?", "how many goats", "Shipyard"):
        np.testing.assert_allclose(grown.bm25.scores(rag.word_split(q)), whole.bm25.scores(rag.word_split(q)),
                                   rtol=0, atol=1e-12)
    torch.testing.assert_close(grown.vectors, whole.vectors, atol=1e-5, rtol=0)  # the same vectors, and IVF
    assert sorted(grown.ivf.ids.tolist()) == list(range(len(grown)))  # cells (grown's centroids are a's) hold all
    # a rebuild replaces the folder; nothing is left beside it
    rag.main(["index", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "whole")])
    assert len(rag.Index.load(tmp_path / "whole")) < len(whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "enc.pt", "grown", "whole"]


def test_bm25_on_tokenizer_ids(tmp_path, tok):
    (tmp_path / "few.jsonl").write_text("\n".join(rag.DOCS.read_text().splitlines()[:20]) + "\n")
    rag.main(["index", str(tmp_path / "few.jsonl"), "--out", str(tmp_path / "idx"), "--bm25_terms", "tokens"])
    index = rag.Index.load(tmp_path / "idx")
    assert set(index.bm25.vocab) <= {str(i) for i in range(tok.vocab_size)}
    top = rag.Retriever(index).search("Where was Fosvou Geltonbrem born?", "bm25", 1)
    assert index.chunks(top)[0].doc == "d000"


# ----------------------------------------------------------------------------------------
# Vectors: exact search, IVF, fusion


def clustered(n, dim=32, n_clusters=200, noise=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, dim, generator=torch.Generator().manual_seed(99)), dim=1)
    x = centres[torch.randint(n_clusters, (n,), generator=g)]
    return F.normalize(x + noise * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=1)


def test_exact_search_and_ivf_recall_against_faiss():
    faiss = pytest.importorskip("faiss")  # faiss-cpu, requirements-dev.txt
    vectors, queries = clustered(4000), clustered(200, seed=1)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors.numpy())
    _, want = flat.search(queries.numpy(), 10)
    scores, got = rag.exact_search(vectors, queries, 10)
    assert (got.numpy() == want).mean() > 0.999  # the same ids (ties aside)
    ivf = rag.IVF.build(vectors)
    assert len(ivf.centroids) == round(4 * math.sqrt(4000))
    recalls = [rag.recall_at_k(ivf.search(queries, 10, nprobe)[1], torch.from_numpy(want)) for nprobe in (1, 8, 32)]
    assert recalls[0] < recalls[1] <= recalls[2] and recalls[1] >= 0.95, recalls
    everything = rag.recall_at_k(ivf.search(queries, 10, len(ivf.centroids))[1], torch.from_numpy(want))
    assert everything > 0.999  # probing every cell is exact search


def test_ivf_add_and_reload_keep_every_vector():
    vectors = clustered(3000, seed=3)
    grown = rag.IVF.build(vectors[:2000], nlist=50)
    grown.add(vectors[2000:])
    assert sorted(grown.ids.tolist()) == list(range(3000))
    torch.testing.assert_close(grown.vectors, vectors[grown.ids])
    loaded = rag.IVF.from_state(grown.state(), vectors)
    for a, b in zip(grown.search(vectors[:5], 10, 4)[1], loaded.search(vectors[:5], 10, 4)[1]):
        assert a.tolist() == b.tolist()
        assert a[0].item() in range(5)  # a stored vector finds itself


def test_reciprocal_rank_fusion_and_rerank():
    fused = rag.reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], k=60)
    # 1: 1/61 + 1/62, 3: 1/63 + 1/61, 2: 1/62, 4: 1/63
    assert fused == [1, 3, 2, 4]
    # weighted: 3: 1/63 + 2/61 = 0.048660 just above 1: 1/61 + 2/62 = 0.048652, then 4: 2/63, 2: 1/62
    assert rag.reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], k=60, weights=[1, 2]) == [3, 1, 4, 2]
    # the head (3 scores) reordered to 6, 7, 5, then fused with the first order 5, 6, 7, 8
    assert rag.rerank([5, 6, 7, 8], [0.1, 0.9, 0.5]) == rag.reciprocal_rank_fusion(
        [[5, 6, 7, 8], [6, 7, 5, 8]], weights=[1, rag.RERANK_WEIGHT])
    assert rag.rerank([5, 6, 7, 8], [0.1, 0.9, 0.5])[:2] == [6, 5]


# ----------------------------------------------------------------------------------------
# The models: encoder pooling, InfoNCE, reranker, reader


@pytest.fixture(scope="module")
def tiny_model(tok):
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))


def test_encoder_mean_pools_real_tokens_only(tiny_model, tok, tmp_path):
    encoder = rag.Encoder(tiny_model, tok, str(rag.TOKENIZER))
    short, long = "Who is Namnam Pezoumband?", "Pezoumband keeps 81 ponies on a farm near Hokinouth, " * 2
    alone = encoder.vectors([short])
    batched = encoder.vectors([long, short, long], batch_size=3)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=0)  # padding changes nothing
    assert torch.allclose(batched.norm(dim=1), torch.ones(3))
    ids = torch.tensor([encoder.ids([short])[0]])
    want = F.normalize(tiny_model.hidden_states(ids).mean(1), dim=-1)[0]
    torch.testing.assert_close(alone[0], want.detach(), atol=1e-5, rtol=0)
    out, n_tokens = encoder.embed(["a", tok.encode("b c")])  # /v1/embeddings: texts or token ids
    assert len(out) == 2 and len(out[0]) == encoder.dim == 32 and isinstance(out[0][0], float)
    assert n_tokens == len(tok.encode("a")) + len(tok.encode("b c"))
    torch.testing.assert_close(torch.tensor(out), encoder.vectors(["a", "b c"]))
    encoder.save(tmp_path / "enc.pt")
    torch.testing.assert_close(rag.Encoder.load(tmp_path / "enc.pt").vectors([short]), alone)
    with pytest.raises(common.NanoError, match="is not a rag.py reranker"):
        rag.Reranker.load(tmp_path / "enc.pt")


def test_info_nce_is_cross_entropy_over_in_batch_negatives():
    g = torch.Generator().manual_seed(0)
    q, p = F.normalize(torch.randn(4, 8, generator=g), dim=1), F.normalize(torch.randn(6, 8, generator=g), dim=1)
    want = sum(-torch.log_softmax(q[i] @ p.T / 0.1, 0)[i] for i in range(4)) / 4
    torch.testing.assert_close(rag.info_nce(q, p, 0.1), want)
    same = torch.zeros(4, 6, dtype=torch.bool)
    same[0, 2] = same[0, 0] = True  # question 0's passage is also p[2]: not a negative for it
    masked = rag.info_nce(q, p, 0.1, same)
    keep = [0, 1, 3, 4, 5]
    row0 = -torch.log_softmax(q[0] @ p[keep].T / 0.1, 0)[0]
    torch.testing.assert_close(masked, (row0 + sum(-torch.log_softmax(q[i] @ p.T / 0.1, 0)[i] for i in (1, 2, 3))) / 4)


def test_reranker_is_the_bi_encoders_cosine_with_the_passage_reading_the_question(tiny_model, tok, tmp_path):
    encoder = rag.Encoder(tiny_model, tok, str(rag.TOKENIZER))
    reranker = rag.Reranker(tiny_model, tok, str(rag.TOKENIZER), temperature=0.05)
    question, passages = "Where was A born?", ["A: born in Osk.", "B: keeps 3 goats on a farm near Vel " * 3]
    scores = reranker.scores(question, passages)
    assert scores == pytest.approx([reranker.forward([reranker.pair_ids(question, p)]).item() for p in passages],
                                   abs=1e-4)  # a pair scores the same alone and in a padded batch
    ids, n = reranker.pair_ids(question, passages[0])
    assert ids == tok.encode(question) + tok.encode(passages[0]) and n == len(tok.encode(question))
    with torch.no_grad():  # the question part is causal: exactly the bi-encoder's question vector
        hidden = tiny_model.hidden_states(torch.tensor([ids]))[0]
        q, p = F.normalize(hidden[:n].mean(0), dim=0), F.normalize(hidden[n:].mean(0), dim=0)
    torch.testing.assert_close(q, encoder.vectors([question])[0], atol=1e-5, rtol=0)
    assert scores[0] == pytest.approx(20 * (q @ p).item(), abs=1e-4)
    long_ids, long_n = reranker.pair_ids("question " * 100, "word " * 500)
    assert len(long_ids) == 64 and long_n == 32
    reranker.log_scale.data.fill_(1.5)
    reranker.save(tmp_path / "rr.pt")
    loaded = rag.Reranker.load(tmp_path / "rr.pt")
    assert loaded.log_scale.item() == 1.5 and loaded.scores(question, passages) == pytest.approx(
        reranker.scores(question, passages), abs=1e-5)
    assert rag.listwise_loss(torch.tensor([[5.0, 0.0], [0.0, 5.0]])).item() == pytest.approx(
        (math.log(1 + math.exp(-5)) + math.log(1 + math.exp(5))) / 2)


def test_grounded_prompt_citations_and_exact_match(tiny_model, tok):
    prompt = rag.grounded_prompt("Where?", ["A: x", "B: y"])
    assert prompt == "Question: Where?\n[1] A: x\n[2] B: y\nQuestion: Where?\nAnswer:"
    assert rag.grounded_prompt("Where?", []) == "Question: Where?\nAnswer:"
    assert rag.split_citations(rag.grounded_response("Nen brou", 2)) == ("Nen brou", [2])
    assert rag.split_citations(" Osk [1][3]") == ("Osk", [1, 3])
    assert rag.normalize_answer("The  Hothfuth Mill.") == rag.normalize_answer("hothfuth mill")
    out = rag.generate_answers(tiny_model, tok, [prompt, "Question: Who?\nAnswer:"], max_new_tokens=4)
    assert len(out) == 2 and all("\n" not in a for a in out)


def test_quoted_answers_continue_a_run_of_a_passage(tiny_model, tok, monkeypatch):
    sources = [[1, 2, 3], [2, 4]]  # None: the run may end there
    assert rag.quoted_next(sources, []) == {1, 2, 3, 4} and rag.quoted_next(sources, [2]) == {3, 4, None}
    assert rag.quoted_next(sources, [2], word_starts={4}) == {3, 4, None}  # 4 starts a word: "2" is whole
    assert rag.quoted_next(sources, [1], word_starts={4}) == {2}  # 1 is part of the word "1 2"
    assert rag.quoted_next(sources, [1, 2, 3], word_starts=set()) == {None} and rag.quoted_next(sources, [2, 1]) == set()
    first, right, wrong, cite = (tok.encode(w)[0] for w in (" Feilfouthqueth", " Leindstomheis", " Runbreimsteis", " [1]"))
    assert len({first, right, wrong, cite}) == 4
    prefer = torch.zeros(tok.vocab_size)  # a reader that knows the first name and guesses the second
    prefer[[first, wrong, right, cite]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    monkeypatch.setattr(rag.sample, "forward_no_cache", lambda model, rows: prefer.repeat(len(rows), 1))
    passage = "Kaindgros Quoga: His oldest friend is Feilfouthqueth Leindstomheis."
    quoted, closed = rag.generate_answers(tiny_model, tok, ["Q", "Q"], max_new_tokens=3, passages=[[passage], []])
    assert quoted == " Feilfouthqueth Leindstomheis" + tok.decode([cite])  # the run the passage holds, then " "
    assert closed == " Feilfouthqueth Feilfouthqueth Feilfouthqueth"  # no passages: free
    prefer[:] = 0
    prefer[[tok.encode(" 3")[0], cite]] = torch.tensor([2.0, 1.0])  # " 3" then the citation: "31" is cut
    assert rag.generate_answers(tiny_model, tok, ["Q"], 3, passages=[["He lives at number 31."]]) == [" 31 "]
    monkeypatch.undo()
    out = rag.generate_answers(tiny_model, tok, ["Question: Who?\n[1] A: Osk Nen\nAnswer:"], 6, passages=[["A: Osk Nen"]])
    assert len(out) == 1 and "\n" not in out[0]


def test_grounded_examples_cite_the_relevant_passage_and_swap_answers(tok):
    chunks = list(rag.chunk_docs(rag.read_docs([rag.DOCS]), tok, 32, 8))[:60]
    docs = {c.doc for c in chunks}
    questions = [q for q in rag.read_qa(rag.QA) if q["doc"] in docs]
    relevant = rag.relevant_chunks(questions, chunks)
    qa = rag.QAData(chunks, [q for q, r in zip(questions, relevant) if r], [r for r in relevant if r])
    negatives = rag.mine_negatives(qa.chunks, qa.questions, qa.relevant)
    kinds = {}
    for q, rel in zip(qa.questions, qa.relevant):
        kinds.setdefault(rag.question_kind(q, qa.chunks[min(rel)].title), []).append(q["answer"])
    assert "Where was {} born?" in kinds
    rng, swapped = random.Random(0), 0
    for i in range(len(qa.questions)):
        true = rag.grounded_example(qa, i, negatives, 3, 0.0, rng, kinds)
        other = rag.grounded_example(qa, i, negatives, 3, 1.0, rng, kinds)
        for ex, want in ((true, qa.questions[i]["answer"]), (other, None)):
            answer, (cite,) = rag.split_citations(ex["response"])
            passages = ex["prompt"].split("\n")[1:-2]
            assert len(passages) == 3 and passages[cite - 1].startswith(f"[{cite}] ")
            assert answer in passages[cite - 1] and (want is None or answer == want)
        kind = rag.question_kind(qa.questions[i], qa.chunks[min(qa.relevant[i])].title)
        assert rag.split_citations(other["response"])[0] in kinds[kind]  # an answer of the same kind
        swapped += rag.split_citations(other["response"])[0] != qa.questions[i]["answer"]
    assert swapped > len(qa.questions) / 2
    firsts = [rag.split_citations(rag.grounded_example(qa, i, negatives, 3, 0.0, rng, gold_first=g)["response"])[1]
              for g in (1.0, 0.0) for i in range(len(qa.questions))]
    n = len(qa.questions)
    assert firsts[:n] == [[1]] * n and 0.2 < sum(c == [1] for c in firsts[n:]) / n < 0.5  # else uniform
    chunk, q = qa.chunks[0], next(q for q, r in zip(qa.questions, qa.relevant) if 0 in r)
    swapped = rag.substitute_answer(chunk, q, "Zzz")
    assert swapped.text == chunk.text.replace(q["answer"], "Zzz", 1) and swapped.start == chunk.start


def test_sft_batch_puts_the_loss_on_the_response_only(tok):
    examples = [{"prompt": "Question: a?\nAnswer:", "response": " x [1]"}, {"prompt": "Q", "response": " yy"}]
    x, y = rag.sft_batch(tok, examples, 64, "cpu")
    for row, ex in enumerate(examples):
        prompt, response = tok.encode(ex["prompt"]), tok.encode(ex["response"]) + [tok.eot_id]
        n = len(prompt) + len(response) - 1
        assert x[row, :n].tolist() == (prompt + response)[:-1]
        assert y[row, :n].tolist() == [-1] * (len(prompt) - 1) + response and (y[row, n:] == -1).all()
    x, y = rag.sft_batch(tok, [{"prompt": "word " * 100, "response": " end"}], 16, "cpu")
    assert x.shape == (1, 16) and y[0, -2:].tolist() == tok.encode(" end")[-1:] + [tok.eot_id]


def test_metrics():
    assert rag.recall([5, 1, 2], {1, 9}, 2) == 0.5
    assert rag.ndcg([5, 1, 2], {1}, 10) == pytest.approx(1 / math.log2(3))
    assert rag.ndcg([1, 9, 2], {1, 9}, 10) == 1.0
    assert rag.retrieval_metrics([[1, 2], [3]], [{1}, set()]) == {"recall@5": 1.0, "ndcg@10": 1.0}


# ----------------------------------------------------------------------------------------
# The shipped QA set


def test_shipped_qa_set_is_consistent_and_reproducible(tok):
    docs = {d: (title, text) for d, title, text, _ in rag.read_docs([rag.DOCS])}
    questions = rag.read_qa(rag.QA)
    assert sum(p.stat().st_size for p in rag.ASSETS.iterdir()) < 700_000
    for q in questions:
        assert docs[q["doc"]][1][q["start"]:q["end"]] == q["answer"]
    people = {s: {docs[q["doc"]][0] for q in questions if q["split"] == s} for s in ("train", "test")}
    assert len(people["test"]) == 60 and not people["train"] & people["test"]
    chunks = list(rag.chunk_docs(rag.read_docs([rag.DOCS]), tok, 32, 8))
    assert all(rag.relevant_chunks(questions, chunks))  # every answer lies whole in some chunk
    spec = importlib.util.spec_from_file_location("make_qa", rag.ASSETS / "make_qa.py")
    make_qa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_qa)
    made_docs, made_qa = make_qa.make(random.Random(make_qa.SEED))
    assert made_docs == [json.loads(line) for line in rag.DOCS.read_text().splitlines()]
    assert made_qa == [json.loads(line) for line in rag.QA.read_text().splitlines()]


# ----------------------------------------------------------------------------------------
# CLI


def test_index_and_ask_on_the_shipped_documents(tmp_path, capsys):
    rag.main(["index", str(rag.DOCS), "--out", str(tmp_path / "idx")])
    out = capsys.readouterr().out
    assert "indexed 2,561 chunks" in out
    next_command = out.strip().splitlines()[-1]
    assert next_command.startswith("next: python rag.py ask ")
    printed = subprocess.run(shlex.split(next_command[len("next: "):]), cwd=ROOT, capture_output=True, text=True)
    assert printed.returncode == 0 and "[1] Fosvou Geltonbrem: Fosvou Geltonbrem was born" in printed.stdout
    result = rag.main(["ask", str(tmp_path / "idx"), "Where was Fosvou Geltonbrem born?", "--k", "2"])
    assert len(result["passages"]) == 2 and "born in Nenbrou" in result["passages"][0]["text"]
    assert "(d000, characters 0-" in capsys.readouterr().out


OPENED = []  # (event, path) of every file opened while a test watches (an audit hook cannot be removed)
WATCH = []  # the names of the files to watch


def watch_opens(event, args):
    if event == "open" and WATCH and isinstance(args[0], (str, os.PathLike)) and Path(args[0]).name in WATCH:
        OPENED.append(Path(args[0]).name)


def generated_corpus(path, mb: float):
    """The shipped documents repeated (each copy its own ids) until the .jsonl holds `mb` megabytes."""
    docs = [json.loads(line) for line in rag.DOCS.read_text().splitlines()]
    with path.open("w", encoding="utf-8") as f:
        written, copy = 0, 0
        while written < mb * 1e6:
            for doc in docs:
                written += f.write(json.dumps(doc | {"id": f"{doc['id']}-{copy}"}) + "\n")
            copy += 1


def test_a_few_megabytes_index_in_one_read_with_a_progress_bar_and_a_query_reads_k_chunks(tmp_path, capsys):
    generated_corpus(tmp_path / "corpus.jsonl", 2)
    (tmp_path / "notes.txt").write_text("Ilse Varn keeps 12 goats near Osk. " * 2000)  # one big text document
    sys.addaudithook(watch_opens)
    WATCH[:] = ["corpus.jsonl", "notes.txt", "chunks.jsonl"]
    try:
        rag.main(["index", str(tmp_path / "corpus.jsonl"), str(tmp_path / "notes.txt"), "--out", str(tmp_path / "idx")])
        assert OPENED.count("corpus.jsonl") == OPENED.count("notes.txt") == 1  # each file is read once, streamed
        err = capsys.readouterr().err
        assert "\rindex [" in err and "[####################] 2.1/2.1 MB" in err  # the bar reaches the total
        OPENED.clear()
        result = rag.main(["ask", str(tmp_path / "idx"), "How many goats does Ilse Varn keep?"])
        assert OPENED == ["chunks.jsonl"]  # a query reads its k chunks by offset, never the documents
    finally:
        WATCH.clear()
        OPENED.clear()
    assert result["passages"][0]["doc"] == str(tmp_path / "notes.txt")
    assert len(rag.Index.load(tmp_path / "idx")) > 20_000


def test_pipeline_skips_trained_steps_and_prints_the_table(tmp_path, tiny_model, tok, capsys):
    out = tmp_path / "out-rag"
    for name in ("encoder", "reranker", "generator"):
        (out / name).mkdir(parents=True)
    rag.Encoder(tiny_model, tok, str(rag.TOKENIZER)).save(out / "encoder" / "ckpt.pt")
    rag.Reranker(tiny_model, tok, str(rag.TOKENIZER)).save(out / "reranker" / "ckpt.pt")
    gpt.save_checkpoint(out / "generator" / "ckpt.pt", tiny_model, str(rag.TOKENIZER), rag="generator")
    r = rag.main(["pipeline", "--out", str(out), "--limit", "4"])
    assert list(r) == ["bm25", "dense", "hybrid", "hybrid + reranker", "reader"]
    assert json.loads((out / "eval.json").read_text()) == r
    printed = capsys.readouterr().out
    assert "4 test questions, 2561 chunks" in printed and "top 3 of hybrid + reranker" in printed
    assert "pipeline:" in printed and "encoder iter" not in printed  # nothing was trained


@pytest.mark.parametrize("argv,message", [
    (["nope"], "unknown command 'nope'"),
    (["index", "--out", "x"], "index takes DOCS... before its options (got 0"),
    (["index", "missing.jsonl"], "missing.jsonl is not found"),
    (["index", "assets/rag/docs.jsonl", "--chunk_overlap", "40"], "--chunk_overlap 40 must be below --chunk_tokens 32"),
    (["index", "assets/rag/docs.jsonl", "--bm25_terms", "chars"], "--bm25_terms must be words or tokens"),
    (["index", "assets/rag/docs.jsonl", "--encoder", "nope.pt"], "--encoder nope.pt not found"),
    (["ask", "assets/rag", "question"], "assets/rag is not a rag.py index"),
    (["ask", "only-one-argument"], "takes INDEX QUESTION before its options"),
    (["train_encoder", "--max_iters", "0"], "--max_iters must be positive"),
    (["train_reranker", "--docs", "nope.jsonl"], "--docs nope.jsonl not found"),
    (["eval", "assets/rag"], "assets/rag is not a rag.py index"),
])
def test_bad_input_is_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        rag.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_help_lists_every_option_with_its_default(capsys):
    rag.main(["--help"])
    out = capsys.readouterr().out
    for name in rag.COMMANDS:
        assert f"python rag.py {name}" in out
    for name, (_, cls, _, _) in rag.COMMANDS.items():
        with pytest.raises(SystemExit) as e:
            rag.main([name, "--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0 and f"python rag.py {name}" in text
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in text
        assert text.count("(default:") == len(dataclasses.fields(cls))


# ----------------------------------------------------------------------------------------
# Slow: the whole pipeline with rag.py's defaults, and the figures


@pytest.mark.slow  # ~40 min on 2 CPU cores (measured under load 12-07): base, encoder, reranker, reader (3,500 steps)
def test_pipeline_figures(tmp_path):
    r = rag.main(["pipeline", "--out", str(tmp_path / "out-rag")])
    for metric in ("recall@5", "ndcg@10"):
        assert r["hybrid"][metric] > max(r["bm25"][metric], r["dense"][metric])
    assert r["hybrid + reranker"]["ndcg@10"] >= r["hybrid"]["ndcg@10"] + 0.02
    reader = r["reader"]
    assert reader["no_retrieval"]["exact_match"] <= 0.05 and reader["with_retrieval"]["exact_match"] >= 0.6
    assert reader["with_retrieval"]["citation_precision"] >= 0.9
