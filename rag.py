"""Retrieval-augmented generation from scratch: chunking, BM25, a dense retriever we train, a vector index, hybrid fusion, a reranker, and grounded answers that cite their sources.

A language model knows only what its weights hold. RAG (Lewis et al. 2020, arXiv:2005.11401)
looks the facts up instead: cut the documents into chunks, find the chunks that answer the
question, put them in the prompt with ids, and let the model answer from them, citing [1]-style
ids so that every answer points at its source. This file builds each part from scratch:

- chunking: a document is cut into chunks of at most `chunk_tokens` tokens, `chunk_overlap`
  tokens repeated between neighbours, always between words; each chunk keeps its document's id
  and title and its character offsets, so a citation leads back to the exact place. A chunk
  is retrieved and read as "title: text", so a chunk that says "She" still names its person.
- BM25 (Robertson & Zaragoza 2009): Okapi's term weighting with Lucene's IDF
  log(1 + (N - df + 0.5) / (df + 0.5)), the one bm25s uses by default (tested equal to it). The
  index stores counts (term frequencies, lengths) and applies N, df and the mean length at query
  time, so adding documents gives exactly the scores of a rebuild (tested).
- dense retrieval: a bi-encoder (DPR, Karpukhin et al. 2020, arXiv:2004.04906) = our GPT's
  hidden states, mean-pooled over the text's tokens and L2-normalised, one model for questions
  and passages, trained with InfoNCE: each question's passage must beat every other passage of
  the batch (in-batch negatives) and one BM25 hard negative, at temperature tau.
- a vector index: exact cosine search (a matrix product), and IVF (the inverted file of faiss;
  Jegou et al. 2011): k-means cuts the vectors into nlist cells and a query scans only its
  nprobe nearest cells; `index` prints its recall@10 against exact search and its speed-up.
- hybrid: reciprocal rank fusion (Cormack et al. 2009): score(d) = sum over rankings of
  1 / (60 + rank), no score scales to calibrate.
- a reranker: a cross-encoder (our GPT reads the question, then the passage, which attends to
  it; the cosine of the two parts' mean states scores them) reorders the hybrid top k, and that
  order is fused with the hybrid one by RRF; it starts from the bi-encoder and is trained
  listwise, one relevant chunk against the hybrid search's hard negatives.
- grounded generation: the question and the top passages go into the prompt as "[1] ...", the
  model answers "Nenbrou [1]"; an SFT task (prompt/response pairs in finetune.py's format, the
  loss on the response) teaches a small GPT to answer from context: prompts drawn afresh at every
  step, their answers swapped for others of the same kind (counterfactual passages: only reading
  gives them), the relevant passage mostly first, as the retrievers rank it. The answer is
  quoted (constrained decoding): each of its tokens must continue a run of whole words of one
  of the passages, so the reader chooses where the answer is and copies it exactly; it could not
  copy on its own (free decoding: the right first token, the rest guessed; 56% vs 80% right).

No embedding model can be downloaded here: the retriever, the reranker and the reader are all
trained from one small GPT (out-rag/base: 4 layers, 128 wide, rotary positions), pretrained on
documents no question asks about, each read twice (meant to teach copying from the context; it
learns the 150 documents by heart instead: no induction heads) (a base that knew the training
people's facts let the reranker and the reader answer from memory: they then failed on unseen
people).

The shipped QA set (assets/rag/, 0.57 MB, written by assets/rag/make_qa.py, seed 30): 450
biographies of invented people (names, towns, firms and numbers drawn at random, so no model
can know a fact without retrieval; first names and surnames come from small pools, so people
share them, and spouses, friends and mothers are named too), 2,100 questions with their
answer's document and character offsets, half worded unlike their sentence ("What is the
birthplace of X?" for "X was born in Y"), 240 training and 60 test people (no test fact is
in any training text), 150 people without questions (the base's pretraining text), and tok.bpe,
a 1,024-token byte-level BPE (bpe.py) learned on every document but the test people's.

Run (each command prints the next one):
  python rag.py index assets/rag/docs.jsonl --out out-rag/idx     # BM25; any .jsonl or text files
  python rag.py ask out-rag/idx "Where was Fosvou Geltonbrem born?"
  python rag.py train_encoder      # -> out-rag/encoder/ckpt.pt (pretrains out-rag/base first)
  python rag.py index assets/rag/docs.jsonl --out out-rag/idx --encoder out-rag/encoder/ckpt.pt
  python rag.py train_reranker     # -> out-rag/reranker/ckpt.pt
  python rag.py train_generator    # -> out-rag/generator/ckpt.pt (grounded SFT)
  python rag.py eval out-rag/idx --reranker out-rag/reranker/ckpt.pt --generator out-rag/generator/ckpt.pt
  python rag.py ask out-rag/idx "Where was Fosvou Geltonbrem born?" --reranker out-rag/reranker/ckpt.pt \
      --generator out-rag/generator/ckpt.pt       # the passages, then the answer with its source
  python rag.py pipeline           # all of the above with the defaults, then eval's table
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common
import data
import finetune
import gpt
import sample
import tokenizer
from common import NanoError

ASSETS = Path(__file__).resolve().parent / "assets" / "rag"
DOCS, QA, TOKENIZER = ASSETS / "docs.jsonl", ASSETS / "qa.jsonl", ASSETS / "tok.bpe"


class Progress:
    """A one-line progress bar on stderr: done / total, rate and ETA, redrawn at most 4 times a second."""

    def __init__(self, what: str, total: float, unit="", scale=1.0):
        self.what, self.total, self.unit, self.scale = what, total, unit, scale
        self.t0 = self.shown = time.time()

    def update(self, done: float, force=False):
        now = time.time()
        if not force and now - self.shown < 0.25:
            return
        self.shown, rate = now, done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate else 0
        bar = "#" * int(20 * done / max(self.total, 1))
        print(f"\r{self.what} [{bar:<20}] {done / self.scale:,.1f}/{self.total / self.scale:,.1f}{self.unit} "
              f"{rate / self.scale:,.1f}{self.unit}/s ETA {eta:.0f}s ", end="", file=sys.stderr, flush=True)

    def close(self, done: float):
        self.update(done, force=True)
        print(file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# Chunking: documents -> chunks of at most chunk_tokens tokens, with overlap, and their offsets

WORD = re.compile(r"\s*\S+")  # a word with the whitespace before it (BPE never merges across words)


def read_docs(paths):
    """Yield (doc id, title, text, bytes read before it) from each path, each file read once: a
    .jsonl holds one {"text", "id"?, "title"?} per line (id: path:line), any other file is one
    document (id: its path, title: its name without the suffix)."""
    done = 0
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = parse_doc_line(line, f"{path} line {n}")
                        yield str(row.get("id", f"{path}:{n}")), str(row.get("title", "")), row["text"], done
                    done += len(line.encode("utf-8"))
        else:
            yield str(path), path.stem, data.read_text_file(path, "DOCS"), done
            done += path.stat().st_size


def parse_doc_line(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise NanoError(f"{where} is not JSON ({e.msg}; one {{\"text\": ...}} object per line)") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise NanoError(f"{where} needs a string field 'text' (and optionally 'id', 'title')")
    return row


def chunk_spans(text: str, count_tokens, size: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans (start, end) of chunks of at most `size` tokens (a longer single word is a
    chunk of its own), each starting `overlap` tokens or fewer before the previous one ended.
    Cuts fall between words, so a word is never split and offsets stay exact. Tokens are counted
    as in running text: each word with the whitespace before it."""
    words = [(m.start(), m.end(), count_tokens(m.group())) for m in WORD.finditer(text)]
    spans, i = [], 0
    while i < len(words):
        j, n = i, 0
        while j < len(words) and (j == i or n + words[j][2] <= size):
            n, j = n + words[j][2], j + 1
        start = words[i][0] + len(text[words[i][0]:words[i][1]]) - len(text[words[i][0]:words[i][1]].lstrip())
        spans.append((start, words[j - 1][1]))
        if j == len(words):
            break
        k, back = j, 0  # step back over up to `overlap` tokens, but always move forward
        while k - 1 > i and back + words[k - 1][2] <= overlap:
            k, back = k - 1, back + words[k - 1][2]
        i = k
    return spans


@dataclass
class Chunk:
    doc: str  # the document's id
    title: str
    start: int  # character offsets in the document's text
    end: int
    text: str

    def passage(self) -> str:
        """What the retrievers and the reader see: the title names the subject of every chunk."""
        return f"{self.title}: {self.text}" if self.title else self.text


def chunk_docs(docs, tok, size: int, overlap: int, progress: Progress | None = None):
    """Yield the Chunks of read_docs' documents; token counts by `tok`, cached per word. progress:
    advanced chunk by chunk (a single big text file moves the bar too)."""
    count = lru_cache(maxsize=1 << 16)(lambda word: len(tok.encode(word)))
    for doc, title, text, at in docs:
        for start, end in chunk_spans(text, count, size, overlap):
            yield Chunk(doc, title, start, end, text[start:end])
            if progress:
                progress.update(at + end)  # characters for bytes: close enough for a progress bar


# ----------------------------------------------------------------------------------------
# BM25: Okapi term weighting, Lucene's IDF; counts stored, statistics applied at query time


def word_split(text: str) -> list[str]:
    """BM25's default terms: lowercased runs of letters and digits."""
    return re.findall(r"\w+", text.lower())


class BM25:
    """score(q, d) = sum over the terms t of q of
           idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)),
       idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))            (Lucene's, always > 0)
    tf saturates (k1: how fast), long documents are discounted (b: how much). A query term that
    appears twice counts twice. Stored per chunk: its distinct terms and their counts, and its
    length; N, df and avgdl come from those at query time, so add() then search == rebuild."""

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        if k1 < 0 or not 0 <= b <= 1:
            raise NanoError(f"BM25 needs k1 >= 0 and b in [0, 1] (got k1={k1}, b={b})")
        self.k1, self.b = k1, b
        self.vocab: dict[str, int] = {}
        self.doc_ptr = np.zeros(1, dtype=np.int64)  # chunk i's terms are terms[doc_ptr[i]:doc_ptr[i+1]]
        self.terms = np.zeros(0, dtype=np.int32)
        self.tfs = np.zeros(0, dtype=np.int32)
        self.lengths = np.zeros(0, dtype=np.int64)
        self._new = []  # (terms, tfs, length) of documents added since the last search or save
        self._postings = None  # the same counts by term, built on the first search after a change

    def __len__(self):
        return len(self.lengths) + len(self._new)

    def add(self, token_lists):
        """Append documents, each a list of terms (word_split's, or token ids as strings)."""
        for tokens in token_lists:
            counts = Counter(tokens)
            self._new.append((np.array([self.vocab.setdefault(t, len(self.vocab)) for t in counts], dtype=np.int32),
                              np.fromiter(counts.values(), dtype=np.int32, count=len(counts)), len(tokens)))
        self._postings = None

    def _merge_new(self):
        """Append the documents added since the last merge to the arrays (once, not per add)."""
        if self._new:
            terms, tfs, lengths = zip(*self._new)
            self.doc_ptr = np.concatenate([self.doc_ptr, self.doc_ptr[-1] + np.cumsum([len(t) for t in terms])])
            self.terms, self.tfs = np.concatenate([self.terms, *terms]), np.concatenate([self.tfs, *tfs])
            self.lengths = np.concatenate([self.lengths, np.array(lengths, dtype=np.int64)])
            self._new = []

    def postings(self):
        """(term_ptr, docs, tfs) sorted by term: term t occurs in docs[term_ptr[t]:term_ptr[t+1]]."""
        if self._postings is None:
            self._merge_new()
            docs = np.repeat(np.arange(len(self.lengths)), np.diff(self.doc_ptr))
            order = np.argsort(self.terms, kind="stable")
            term_ptr = np.zeros(len(self.vocab) + 1, dtype=np.int64)
            term_ptr[1:] = np.cumsum(np.bincount(self.terms, minlength=len(self.vocab)))
            self._postings = term_ptr, docs[order], self.tfs[order]
        return self._postings

    def scores(self, query_tokens) -> np.ndarray:
        """float64 scores of every document for the query's terms (unknown terms add nothing)."""
        term_ptr, docs, tfs = self.postings()
        n = len(self.lengths)
        scores = np.zeros(n)
        if n == 0:
            return scores
        norm = self.k1 * (1 - self.b + self.b * self.lengths / max(self.lengths.mean(), 1e-9))
        for t in query_tokens:
            if t not in self.vocab:
                continue
            lo, hi = term_ptr[self.vocab[t]], term_ptr[self.vocab[t] + 1]
            idf = math.log(1 + (n - (hi - lo) + 0.5) / ((hi - lo) + 0.5))
            d, tf = docs[lo:hi], tfs[lo:hi]
            scores[d] += idf * tf / (tf + norm[d])  # a term occurs once per document in postings
        return scores

    def state(self) -> dict:
        self._merge_new()
        return {"k1": self.k1, "b": self.b, "vocab": list(self.vocab), "doc_ptr": self.doc_ptr,
                "terms": self.terms, "tfs": self.tfs, "lengths": self.lengths}

    @classmethod
    def from_state(cls, s: dict) -> BM25:
        bm25 = cls(float(s["k1"]), float(s["b"]))
        bm25.vocab = {t: i for i, t in enumerate(s["vocab"])}
        bm25.doc_ptr, bm25.terms, bm25.tfs, bm25.lengths = s["doc_ptr"], s["terms"], s["tfs"], s["lengths"]
        return bm25


def top_k(scores, k: int) -> list[int]:
    """Indices of the k highest scores, best first (ties: the lower index first)."""
    scores = np.asarray(scores)
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(len(scores))
    return sorted(part.tolist(), key=lambda i: (-scores[i], i))[:k]


# ----------------------------------------------------------------------------------------
# Dense retrieval: a bi-encoder from our GPT (mean pooling, normalisation), InfoNCE


def pad_batch(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, T_max), right-padded: causal attention never lets a real token see a pad."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    return ids.to(device), mask.to(device)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C): the mean over each row's real tokens (mask True)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


class Encoder:
    """Texts -> unit vectors (B, n_embd): the GPT's final hidden states averaged over the text's
    tokens, then L2-normalised, so a dot product is a cosine. The GPT is causal, so token t has
    seen tokens 0..t only; the mean gives the early tokens a voice through the later ones that
    read them (SGPT, Muennighoff 2022, arXiv:2202.08904, weights later tokens more; the plain
    mean is DPR-style sentence embedding's default). `embed` is what /v1/embeddings serves."""

    def __init__(self, model: gpt.GPT, tok, spec: str):
        self.model, self.tok, self.spec = model, tok, spec
        self.dim, self.name = model.config.n_embd, "encoder"
        self.device = next(model.parameters()).device

    def ids(self, texts) -> list[list[int]]:
        """Token ids of each text, cut to the model's block_size (an empty text becomes one space)."""
        return [self.tok.encode(t or " ")[:self.model.config.block_size] for t in texts]

    def forward(self, rows: list[list[int]]) -> torch.Tensor:
        ids, mask = pad_batch(rows, self.device)
        return F.normalize(mean_pool(self.model.hidden_states(ids), mask), dim=-1)

    @torch.no_grad()
    def vectors(self, texts, batch_size=64, rows=None) -> torch.Tensor:
        """(N, dim) float32 unit vectors, batch by batch (texts sorted by length: less padding);
        rows: token ids instead of texts."""
        self.model.eval()
        rows = self.ids(texts) if rows is None else rows
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = torch.empty(len(rows), self.dim)
        for s in range(0, len(rows), batch_size):
            pick = order[s:s + batch_size]
            out[pick] = self.forward([rows[i] for i in pick]).float().cpu()
        return out

    def embed(self, inputs) -> tuple[list[list[float]], int]:
        """What /v1/embeddings serves: texts or token-id lists -> (their vectors, tokens read). Unlike
        chunks, an input longer than the block or with ids outside the vocabulary is refused."""
        rows = [self.tok.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        block, vocab = self.model.config.block_size, self.model.config.vocab_size
        for i, r in enumerate(rows):
            if not 0 < len(r) <= block:
                raise NanoError(f"input {i} has {len(r)} tokens (this embedding model reads 1 to {block})")
            if not all(0 <= t < vocab for t in r):
                raise NanoError(f"input {i} holds token ids outside 0..{vocab - 1} (send text, or this model's ids)")
        return self.vectors(None, rows=rows).tolist(), sum(map(len, rows))

    def save(self, path, **extra):
        gpt.save_checkpoint(path, self.model, self.spec, rag="encoder", **extra)

    @classmethod
    def load(cls, path, device="cpu") -> Encoder:
        model, spec, ckpt = load_rag_model(path, "encoder", device)
        encoder = cls(model, tokenizer.load_tokenizer(spec), spec)
        encoder.name = Path(path).parent.name  # its id in /v1/embeddings: out-rag/encoder/ckpt.pt -> "encoder"
        return encoder


def load_rag_model(path, kind: str, device):
    """(model, tokenizer spec, checkpoint dict) of a checkpoint this file wrote as `kind`."""
    ckpt = gpt.read_checkpoint(path, device)
    if ckpt.get("rag") != kind:
        raise NanoError(f"{path} is not a rag.py {kind} (train one with python rag.py train_{kind})")
    return gpt.model_from_checkpoint(ckpt, path).to(device), ckpt["tokenizer"], ckpt


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float, same=None) -> torch.Tensor:
    """InfoNCE with in-batch negatives: q (B, C) and p (M >= B, C) unit vectors; the positive of
    question i is p[i], every other row of p is a negative (the other questions' passages, then
    any hard negatives). same (B, M), optional: True where p[j] is question i's passage too (two
    questions about one chunk in a batch); those are not negatives and are masked out."""
    logits = q @ p.T / temperature  # (B, M) cosines / tau
    if same is not None:
        off_diagonal = same & ~torch.eye(*same.shape, dtype=torch.bool, device=same.device)
        logits = logits.masked_fill(off_diagonal, float("-inf"))
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


# ----------------------------------------------------------------------------------------
# The vector index: exact cosine search, and IVF (k-means cells, probe the nearest few)


def exact_search(vectors: torch.Tensor, queries: torch.Tensor, k: int):
    """(scores, ids), each (Q, k): the k largest dot products (cosines of unit vectors)."""
    return torch.topk(queries @ vectors.T, min(k, len(vectors)), dim=1)


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine): k unit centroids; an emptied cell restarts at a random point."""
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = torch.bincount(assign, minlength=k) == 0
        sums[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=g)]
        centroids = F.normalize(sums, dim=1)
    return centroids


class IVF:
    """Inverted file: each vector lives in the cell of its nearest centroid; the vectors are
    stored sorted by cell, so a cell is one contiguous slice. A query computes its similarity to
    the nlist centroids, scans the vectors of its nprobe best cells only and returns their top k.
    Work per query: nlist + N * nprobe / nlist dot products instead of N; the price is recall,
    the true neighbours that sit in cells not probed. nlist ~ 4 sqrt(N) (faiss's rule of thumb)."""

    def __init__(self, centroids: torch.Tensor):
        self.centroids = centroids
        self.ids = torch.zeros(0, dtype=torch.long)  # the vector ids, sorted by cell
        self.vectors = torch.zeros(0, centroids.shape[1])
        self.offsets = torch.zeros(len(centroids) + 1, dtype=torch.long)  # cell c: [offsets[c], offsets[c+1])
        self.cells = torch.zeros(0, dtype=torch.long)

    @classmethod
    def build(cls, vectors: torch.Tensor, nlist: int = 0, seed: int = 0) -> IVF:
        nlist = nlist or max(1, round(4 * math.sqrt(len(vectors))))
        sample_rows = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:256 * nlist]
        ivf = cls(kmeans(vectors[sample_rows], min(nlist, len(vectors)), seed=seed))
        ivf.add(vectors)
        return ivf

    def add(self, vectors: torch.Tensor):
        """Put new vectors (ids continue from the last) into their nearest cells; centroids stay."""
        first = len(self.cells)
        cells = torch.cat([self.cells, (vectors @ self.centroids.T).argmax(1)])
        all_vectors = torch.cat([self.vectors[torch.argsort(self.ids)], vectors])  # back to id order
        order = torch.argsort(cells, stable=True)
        self.cells, self.ids, self.vectors = cells, order, all_vectors[order]
        self.offsets[1:] = torch.cumsum(torch.bincount(cells, minlength=len(self.centroids)), 0)
        return first

    def search(self, queries: torch.Tensor, k: int, nprobe: int = 8):
        """(scores, ids), each a list of Q tensors of at most k entries, best first."""
        probes = torch.topk(queries @ self.centroids.T, min(nprobe, len(self.centroids)), dim=1).indices
        offsets = self.offsets.tolist()
        out_scores, out_ids = [], []
        for q, cells in zip(queries, probes.tolist()):
            spans = [(offsets[c], offsets[c + 1]) for c in cells]  # each cell is one slice: no gather
            scores = torch.cat([self.vectors[a:b] for a, b in spans]) @ q
            best = torch.topk(scores, min(k, len(scores)))
            out_scores.append(best.values)
            out_ids.append(torch.cat([self.ids[a:b] for a, b in spans])[best.indices])
        return out_scores, out_ids

    def state(self) -> dict:
        return {"centroids": self.centroids, "cells": self.cells}

    @classmethod
    def from_state(cls, s: dict, vectors: torch.Tensor) -> IVF:
        ivf = cls(s["centroids"])
        ivf.cells = s["cells"]
        order = torch.argsort(ivf.cells, stable=True)
        ivf.ids, ivf.vectors = order, vectors[order]
        ivf.offsets[1:] = torch.cumsum(torch.bincount(ivf.cells, minlength=len(ivf.centroids)), 0)
        return ivf


def recall_at_k(approx_ids, exact_ids, k: int = 10) -> float:
    """Share of the exact top k that the approximate search also returned."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) / min(k, len(e)) for a, e in zip(approx_ids, exact_ids)]
    return sum(hits) / len(hits)


def ivf_tradeoff(ivf: IVF, vectors: torch.Tensor, queries: torch.Tensor, nprobes=(1, 4, 16, 64), k=10):
    """[(nprobe, recall@10 vs exact, exact ms / ivf ms per query)], one query at a time (as `ask`)."""
    exact = [exact_search(vectors, q[None], k).indices[0] for q in queries]
    exact_ms = common.median_ms(lambda: [exact_search(vectors, q[None], k) for q in queries], repeat=3)
    rows = []
    for nprobe in nprobes:
        if nprobe > len(ivf.centroids):
            break
        approx = ivf.search(queries, k, nprobe)[1]
        ivf_ms = common.median_ms(lambda: [ivf.search(q[None], k, nprobe) for q in queries], repeat=3)
        rows.append((nprobe, recall_at_k(approx, exact, k), exact_ms / ivf_ms))
    return rows


# ----------------------------------------------------------------------------------------
# Hybrid: reciprocal rank fusion


def reciprocal_rank_fusion(rankings, k: int = 60, weights=None) -> list[int]:
    """Fuse ranked lists of ids: score(d) = sum over the lists that hold d of w / (k + rank),
    rank 1 first, w = 1 unless weights gives one per list (Cormack et al. 2009). Only ranks count,
    so BM25's unbounded scores and the cosines need no common scale; k = 60 damps the weight of
    the very first ranks."""
    score = {}
    for ranking, w in zip(rankings, weights or [1.0] * len(rankings)):
        for rank, d in enumerate(ranking, 1):
            score[d] = score.get(d, 0.0) + w / (k + rank)
    return sorted(score, key=lambda d: (-score[d], d))


# ----------------------------------------------------------------------------------------
# The reranker: a cross-encoder that reads passage and question together


class Reranker(nn.Module):
    """A cross-encoder: one forward pass reads the question's tokens, then the passage's, so every
    passage token attends to the question (a causal model cannot look ahead) and can notice that
    it matches the asked name or fact. score = scale * cos(mean of the question's final states,
    mean of the passage's): the bi-encoder's score, except that the passage has read the question.
    Started from the trained bi-encoder it ranks like the bi-encoder on its first step (a linear
    head on the pooled states, started from scratch, learnt far slower here) and training teaches
    the passage what to look for. One pass per pair: it only reorders the top k."""

    def __init__(self, model: gpt.GPT, tok, spec: str, temperature: float = 0.05):
        super().__init__()
        self.model, self.tok, self.spec = model, tok, spec
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def pair_ids(self, question: str, passage: str) -> tuple[list[int], int]:
        """(the question's tokens then the passage's, cut to the block; the question's length)."""
        block = self.model.config.block_size
        q = self.tok.encode(question or " ")[:block // 2]
        return q + self.tok.encode(passage or " ")[:block - len(q)], len(q)

    def forward(self, rows: list[tuple[list[int], int]]) -> torch.Tensor:
        ids, mask = pad_batch([r for r, _ in rows], self.log_scale.device)
        hidden = self.model.hidden_states(ids)
        in_question = torch.arange(ids.shape[1], device=ids.device)[None] < torch.tensor([n for _, n in rows],
                                                                                    device=ids.device)[:, None]
        q, p = mean_pool(hidden, in_question), mean_pool(hidden, mask & ~in_question)
        return self.log_scale.exp() * F.cosine_similarity(q, p, dim=-1)

    @torch.no_grad()
    def scores(self, question: str, passages: list[str]) -> list[float]:
        self.eval()
        return self.forward([self.pair_ids(question, p) for p in passages]).float().tolist()

    def save(self, path, **extra):
        gpt.save_checkpoint(path, self.model, self.spec, rag="reranker", log_scale=self.log_scale.item(), **extra)

    @classmethod
    def load(cls, path, device="cpu") -> Reranker:
        model, spec, ckpt = load_rag_model(path, "reranker", device)
        reranker = cls(model, tokenizer.load_tokenizer(spec), spec).to(device)
        reranker.log_scale.data.fill_(ckpt["log_scale"])
        return reranker


RERANK_WEIGHT = 2.0  # chosen on the 168 validation questions (weights 0.5, 1, 2, 4 tried)


def rerank(ranked: list[int], scores: list[float]) -> list[int]:
    """The first stage's ranking with its head (as many as scores) reordered by the reranker, then
    fused with the first stage's own order by RRF, the reranker's order counted RERANK_WEIGHT
    times: the two agree on most of the top, and a small reranker's confident mistake cannot bury
    what both retrievers put first (measured on the validation questions, 12-07: hybrid nDCG@10
    0.919, reranked top 20 alone 0.964, fused at weight 1 0.957, at weight 2 0.975)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return reciprocal_rank_fusion([ranked, [ranked[i] for i in order] + ranked[len(scores):]],
                                  weights=[1.0, RERANK_WEIGHT])


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """scores (B, G): column 0 the relevant passage, the rest negatives; softmax cross-entropy."""
    return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device))


# ----------------------------------------------------------------------------------------
# Grounded generation: passages with ids in the prompt, an answer that cites them

CITATION = re.compile(r"\s*\[(\d+)\]")


def grounded_prompt(question: str, passages: list[str]) -> str:
    """The reader's prompt: the question, the numbered passages, the question again (no passages:
    closed book). Asked first, the question lets a causal model read each passage knowing what it
    looks for (query-aware contextualization, Liu et al. 2023, arXiv:2307.03172); asked again last,
    it sits next to the answer."""
    if not passages:
        return f"Question: {question}\nAnswer:"
    context = "".join(f"[{i}] {p}\n" for i, p in enumerate(passages, 1))
    return f"Question: {question}\n{context}Question: {question}\nAnswer:"


def grounded_response(answer: str, cite: int) -> str:
    return f" {answer} [{cite}]"


def split_citations(text: str) -> tuple[str, list[int]]:
    """("Nenbrou", [1]) from " Nenbrou [1]": the answer without its citations, and the ids."""
    return CITATION.sub("", text).strip(), [int(c) for c in CITATION.findall(text)]


def quoted_next(sources: list[list[int]], prefix: list[int], word_starts=None) -> set:
    """The tokens that extend `prefix` to a run of tokens found in one of `sources` (any of their
    tokens when prefix is empty), and None if the run may end here: after it the passage ends or
    its next token starts a word (is in word_starts; None: any token does). What a reader that
    quotes whole words of its passages may say next."""
    n, after = len(prefix), set()
    for s in sources:
        for i in range(len(s) - n + 1):
            if s[i:i + n] == prefix:
                t = s[i + n] if i + n < len(s) else None
                if n and (t is None or word_starts is None or t in word_starts):
                    after.add(None)
                if t is not None:
                    after.add(t)
    return after


@torch.no_grad()
def generate_answers(model: gpt.GPT, tok, prompts: list[str], max_new_tokens: int = 16, passages=None) -> list[str]:
    """Greedy continuations of each prompt, cut at the end-of-text token or the first newline.
    passages (a list of passages per prompt, or None): the answer is quoted, i.e. until its citation
    starts each token must continue a run of whole words of one of the prompt's passages
    (constrained decoding, quoted_next; a prompt without passages decodes freely). The small reader picks the right place
    (its first token is mostly right) but, with no induction heads, guesses the tokens after it:
    the constraint makes it copy them. Without passages: sample.generate in one left-padded batch."""
    model.eval()
    rows = [tok.encode(p)[-(model.config.block_size - max_new_tokens):] for p in prompts]
    outs = [[] for _ in rows]
    if passages is None or not any(passages):  # nothing to quote: the cached batch decode
        for token in sample.generate(model, rows, max_new_tokens, temperature=0, eos_id=tok.eot_id):
            for out, t in zip(outs, token.tolist()):
                out.append(t)
    else:
        sources = [[tok.encode(" " + p) for p in ps] for ps in passages]  # as they sit in the prompt
        newline = tok.encode("\n")
        ends = {tok.encode(" [1]")[0], tok.eot_id, *newline}
        word_starts = {t for src in sources for s in src for t in s if not tok.decode([t])[:1].isalnum()}
        quoting, live = [bool(s) for s in sources], list(range(len(rows)))
        for _ in range(max_new_tokens):
            for b, logits in zip(live, sample.forward_no_cache(model, [rows[b] + outs[b] for b in live])):
                if quoting[b]:  # the citation's " [" (or the end) once something is quoted
                    after = quoted_next(sources[b], outs[b], word_starts)
                    allowed = after - {None} | (ends if None in after else set())
                    logits = logits + torch.full_like(logits, float("-inf")).index_fill(
                        0, torch.tensor(sorted(allowed), device=logits.device), 0.0)
                outs[b].append(int(logits.argmax()))
                quoting[b] = quoting[b] and outs[b][-1] not in ends
            live = [b for b in live if outs[b][-1] != tok.eot_id and outs[b][-1] not in newline]
            if not live:
                break
    return [tok.decode(out[:out.index(tok.eot_id)] if tok.eot_id in out else out).split("\n")[0] for out in outs]


def normalize_answer(s: str) -> str:
    """SQuAD's exact-match normalisation: lowercase, no punctuation, no articles, single spaces."""
    s = re.sub(r"[^\w\s]", " ", s.lower())
    return " ".join(w for w in s.split() if w not in ("a", "an", "the"))


# ----------------------------------------------------------------------------------------
# The index on disk: chunks.jsonl (+ each line's byte offset), bm25.npz, vectors.npy + ivf.npz


@dataclass
class IndexConfig:
    out: str = field(default="out-rag/idx", metadata={"help": "the index folder (replaced, or added to with --add)"})
    add: bool = field(default=False, metadata={"help": "add the documents to the index at --out instead of "
                                                       "rebuilding it (its chunking, BM25 and encoder settings)"})
    tokenizer: str = field(default=str(TOKENIZER), metadata={"help": "tokenizer spec that counts chunk tokens"})
    chunk_tokens: int = field(default=32, metadata={"help": "tokens per chunk at most"})
    chunk_overlap: int = field(default=8, metadata={"help": "tokens repeated from the end of the previous chunk"})
    bm25_terms: str = field(default="words", metadata={"help": "BM25's terms: words (lowercased) or tokens (--tokenizer's)"})
    k1: float = field(default=1.5, metadata={"help": "BM25 term-frequency saturation"})
    b: float = field(default=0.75, metadata={"help": "BM25 length normalisation, in [0, 1]"})
    encoder: str = field(default="", metadata={"help": "a rag.py encoder checkpoint: also dense vectors + IVF"})
    nlist: int = field(default=0, metadata={"help": "IVF cells (0: 4 sqrt(chunks))"})
    batch_size: int = field(default=64, metadata={"help": "chunks embedded per forward pass"})
    device: str = "auto"


class Index:
    """The chunks (texts on disk; only the k retrieved ones are read per query), BM25 counts, and
    with an encoder the chunk vectors and their IVF cells."""

    FILES = ("meta.json", "chunks.jsonl", "offsets.npy", "bm25.npz", "vectors.npy", "ivf.npz")

    def __init__(self, folder, meta: dict, bm25: BM25, offsets=None, vectors=None, ivf=None):
        self.folder, self.meta, self.bm25 = Path(folder), meta, bm25
        self.offsets = np.zeros(0, dtype=np.int64) if offsets is None else offsets  # byte offset of chunk i
        self.vectors, self.ivf = vectors, ivf

    def __len__(self):
        return len(self.offsets)

    @classmethod
    def load(cls, folder) -> Index:
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise NanoError(f"{folder} is not a rag.py index (build one: python rag.py index DOCS... --out {folder})")
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "bm25.npz") as z:
            bm25 = BM25.from_state({k: z[k] for k in z.files} | {"vocab": meta["bm25_vocab"]})
        offsets = np.load(folder / "offsets.npy")
        vectors = ivf = None
        if meta.get("encoder"):
            vectors = torch.from_numpy(np.load(folder / "vectors.npy"))
            with np.load(folder / "ivf.npz") as z:
                ivf = IVF.from_state({k: torch.from_numpy(z[k]) for k in z.files}, vectors)
        return cls(folder, meta, bm25, offsets, vectors, ivf)

    def chunks(self, ids) -> list[Chunk]:
        """The chunks of these ids, read from chunks.jsonl by their byte offsets."""
        out = []
        with open(self.folder / "chunks.jsonl", "rb") as f:
            for i in ids:
                f.seek(int(self.offsets[i]))
                out.append(Chunk(**json.loads(f.readline())))
        return out

    def add(self, paths, tok, encoder: Encoder | None, batch_size=64, flush_every=2048) -> int:
        """Chunk, count and embed the documents in one pass over them (a progress bar by bytes);
        chunk texts are appended to chunks.jsonl as they come, never held all at once."""
        total = sum(Path(p).stat().st_size for p in paths)
        progress = Progress("index", total, " MB", 1e6)
        terms_of = terms_function(self.meta["bm25_terms"], tok)
        offsets, pending, new_vectors = [], [], []
        with open(self.folder / "chunks.jsonl", "ab") as f:
            size, overlap = self.meta["chunk_tokens"], self.meta["chunk_overlap"]
            for chunk in chunk_docs(read_docs(paths), tok, size, overlap, progress):
                offsets.append(f.tell())
                line = json.dumps(vars(chunk), ensure_ascii=False)  # vars: asdict without its deep copies
                f.write((line + "\n").encode("utf-8"))
                pending.append(chunk.passage())
                if len(pending) == flush_every:
                    self._count_and_embed(pending, terms_of, encoder, batch_size, new_vectors)
                    pending = []
            self._count_and_embed(pending, terms_of, encoder, batch_size, new_vectors)
        progress.close(total)
        self.offsets = np.concatenate([self.offsets, np.array(offsets, dtype=np.int64)])
        if encoder is not None and new_vectors:
            fresh = torch.cat(new_vectors)
            self.vectors = fresh if self.vectors is None else torch.cat([self.vectors, fresh])
            if self.ivf is None:
                self.ivf = IVF.build(self.vectors, self.meta["nlist"])
            else:
                self.ivf.add(fresh)
        return len(offsets)

    def _count_and_embed(self, passages, terms_of, encoder, batch_size, new_vectors):
        self.bm25.add(terms_of(p) for p in passages)
        if encoder is not None and passages:
            new_vectors.append(encoder.vectors(passages, batch_size))

    def save(self):
        self.meta.update(n_chunks=len(self), bm25_vocab=list(self.bm25.vocab))
        save_arrays(self.folder / "offsets.npy", offsets=self.offsets)
        save_arrays(self.folder / "bm25.npz", **{k: v for k, v in self.bm25.state().items() if k != "vocab"})
        if self.vectors is not None:
            save_arrays(self.folder / "vectors.npy", vectors=self.vectors.numpy())
            save_arrays(self.folder / "ivf.npz", **{k: v.numpy() for k, v in self.ivf.state().items()})
        common.atomic_write(self.folder / "meta.json", lambda tmp: tmp.write_text(json.dumps(self.meta)))


def save_arrays(path: Path, **arrays):
    """numpy arrays to path, atomically: .npy holds the one array, .npz all of them."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would add .npy to a temp file's name
            np.save(f, *arrays.values()) if path.suffix == ".npy" else np.savez(f, **arrays)

    common.atomic_write(path, write)


def terms_function(kind: str, tok):
    """BM25's terms: "words" (word_split) or "tokens" (the tokenizer's ids, as strings)."""
    if kind == "words":
        return word_split
    return lambda text: [str(i) for i in tok.encode(text)]


class Retriever:
    """Search an Index: BM25, dense (exact, or IVF with nprobe > 0), hybrid (RRF of both), and
    any of them reranked by a cross-encoder."""

    def __init__(self, index: Index, encoder: Encoder | None = None, reranker: Reranker | None = None,
                 nprobe: int = 0, depth: int = 100, rerank_k: int = 20):
        self.index, self.encoder, self.reranker = index, encoder, reranker
        self.nprobe, self.depth, self.rerank_k = nprobe, depth, rerank_k
        self.terms_of = terms_function(index.meta["bm25_terms"], tokenizer.load_tokenizer(index.meta["tokenizer"]))

    def bm25(self, question: str, k: int) -> list[int]:
        return top_k(self.index.bm25.scores(self.terms_of(question)), k)

    def dense(self, question: str, k: int) -> list[int]:
        if self.encoder is None or self.index.vectors is None:
            raise NanoError("dense search needs an index built with --encoder (python rag.py index ... --encoder CKPT)")
        q = self.encoder.vectors([question])
        if self.nprobe:
            return self.index.ivf.search(q, k, self.nprobe)[1][0].tolist()
        return exact_search(self.index.vectors, q, k).indices[0].tolist()

    def search(self, question: str, method: str = "hybrid", k: int = 10) -> list[int]:
        """Chunk ids, best first: method bm25, dense or hybrid; reranked when a reranker is set."""
        depth = max(k, self.rerank_k if self.reranker else k, self.depth if method == "hybrid" else k)
        if method == "bm25":
            ids = self.bm25(question, depth)
        elif method == "dense":
            ids = self.dense(question, depth)
        elif method == "hybrid":
            ids = reciprocal_rank_fusion([self.bm25(question, depth), self.dense(question, depth)])
        else:
            raise NanoError(f"unknown search method {method!r} (bm25, dense or hybrid)")
        if self.reranker is None:
            return ids[:k]
        scores = self.reranker.scores(question, [c.passage() for c in self.index.chunks(ids[:self.rerank_k])])
        return rerank(ids, scores)[:k]


# ----------------------------------------------------------------------------------------
# The QA set and the retrieval metrics


def read_jsonl(path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise NanoError(f"{what} {path} not found (the shipped one: {QA if 'QA' in what else DOCS})")
    rows = []
    for n, line in enumerate(data.read_text_file(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise NanoError(f"{path} line {n} is not JSON ({e.msg})") from None
    return rows


def read_qa(path) -> list[dict]:
    """Questions {"question", "answer", "doc", "start", "end", "split"}: the answer is
    doc's text[start:end]; a chunk is relevant to the question when its span holds that."""
    rows = read_jsonl(path, "QA file")
    need = {"question": str, "answer": str, "doc": str, "start": int, "end": int, "split": str}
    for n, q in enumerate(rows, 1):
        if not all(isinstance(q.get(k), t) for k, t in need.items()):
            raise NanoError(f"{path} row {n} needs {', '.join(need)} (see assets/rag/qa.jsonl)")
    return rows


def relevant_chunks(questions, chunks) -> list[set[int]]:
    """For each question, the ids of the chunks that hold its whole answer span."""
    by_doc = {}
    for i, c in enumerate(chunks):
        by_doc.setdefault(c.doc, []).append(i)
    return [{i for i in by_doc.get(q["doc"], []) if chunks[i].start <= q["start"] and q["end"] <= chunks[i].end}
            for q in questions]


def recall(ranked, relevant: set, k: int) -> float:
    """Share of the relevant chunks in the top k (BEIR's recall@k)."""
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


def ndcg(ranked, relevant: set, k: int) -> float:
    """nDCG@k with binary relevance: sum of 1 / log2(rank + 1) over the relevant chunks in the
    top k, divided by the same sum for a perfect ranking."""
    dcg = sum(1 / math.log2(r + 2) for r, d in enumerate(ranked[:k]) if d in relevant)
    ideal = sum(1 / math.log2(r + 2) for r in range(min(len(relevant), k)))
    return dcg / ideal if ideal else 0.0


def retrieval_metrics(rankings, relevant) -> dict:
    """Mean recall@5 and nDCG@10 over the questions (each with at least one relevant chunk)."""
    pairs = [(r, rel) for r, rel in zip(rankings, relevant) if rel]
    return {"recall@5": sum(recall(r, rel, 5) for r, rel in pairs) / len(pairs),
            "ndcg@10": sum(ndcg(r, rel, 10) for r, rel in pairs) / len(pairs)}


@dataclass
class QAData:
    """A split of the QA set for training: its documents' chunks, its questions and their relevant chunks."""
    chunks: list[Chunk]
    questions: list[dict]
    relevant: list[set[int]]


def load_training_qa(docs, qa, tok, chunk_tokens, chunk_overlap, val_docs=0.1) -> tuple[QAData, QAData]:
    """(train, val) from the training split only: val holds the questions of its last `val_docs`
    share of documents, retrieved among all the training split's chunks."""
    questions = [q for q in read_qa(qa) if q["split"] == "train"]
    docs_in = list(dict.fromkeys(q["doc"] for q in questions))
    if not docs_in:
        raise NanoError(f"{qa} has no questions with split 'train'")
    val_set = set(docs_in[len(docs_in) - max(1, int(len(docs_in) * val_docs)):])
    wanted = set(docs_in)
    chunks = list(chunk_docs((d for d in read_docs([docs]) if d[0] in wanted), tok, chunk_tokens, chunk_overlap))
    relevant = relevant_chunks(questions, chunks)
    keep = [i for i, r in enumerate(relevant) if r]  # an answer split across chunks is found by none
    split = [[i for i in keep if (questions[i]["doc"] in val_set) == v] for v in (False, True)]
    return tuple(QAData(chunks, [questions[i] for i in s], [relevant[i] for i in s]) for s in split)


def bm25_rankings(chunks, questions, depth: int, k1=1.5, b=0.75) -> list[list[int]]:
    bm25 = BM25(k1, b)
    bm25.add(word_split(c.passage()) for c in chunks)
    return [top_k(bm25.scores(word_split(q["question"])), depth) for q in questions]


# ----------------------------------------------------------------------------------------
# Training: one small loop for the base LM, the bi-encoder, the reranker and the reader


@dataclass
class TrainConfig:
    """Options every trainer here shares."""
    docs: str = field(default=str(DOCS), metadata={"help": "documents, a .jsonl of {id, title, text}"})
    qa: str = field(default=str(QA), metadata={"help": "questions (split train is trained on)"})
    init_from: str = field(default="", metadata={
        "help": "a checkpoint to start from (empty: out_dir/../base/ckpt.pt, pretrained there when missing)"})
    out_dir: str = "out-rag/encoder"
    chunk_tokens: int = field(default=32, metadata={"help": "chunking, as python rag.py index"})
    chunk_overlap: int = 8
    batch_size: int = 32
    max_iters: int = 600
    learning_rate: float = 1e-3
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at learning_rate * this"})
    warmup_iters: int = 30
    weight_decay: float = 0.0
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    eval_interval: int = 100
    log_interval: int = 20
    device: str = "auto"
    seed: int = 1337


@dataclass
class BaseConfig(TrainConfig):
    """The shared base: a small GPT pretrained on the documents that no question asks about."""
    out_dir: str = "out-rag/base"
    tokenizer: str = field(default=str(TOKENIZER), metadata={"help": "tokenizer spec of the base"})
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = field(default=256, metadata={"help": "the reader's prompt (3 passages + question) must fit"})
    repeat: bool = field(default=True, metadata={
        "help": "write each document twice, the second copy predictable by copying from the first (induction "
                "heads, Olsson et al. 2022, arXiv:2209.11895); at 300 steps the base learns the documents by "
                "heart instead (second-copy loss = first's), so the reader's answers are quoted (--quote)"})
    rope_theta: float = field(default=10000.0, metadata={
        "help": "rotary positions (0: GPT-2's learned ones): the reader copies from a passage wherever it sits"})
    max_iters: int = 300
    learning_rate: float = 3e-3
    batch_size: int = 16


def check_train_config(cfg: TrainConfig):
    common.check_options(cfg, positive=("chunk_tokens", "batch_size", "max_iters", "learning_rate", "eval_interval",
                                        "log_interval"),
                         non_negative=("chunk_overlap", "warmup_iters", "weight_decay", "grad_clip"),
                         ranges={"min_lr_ratio": (0.0, 1.0)})
    own = ("temperature", "group_size", "rerank_k", "val_questions", "passages", "n_layer", "n_head", "n_embd",
           "block_size")  # the options of one trainer or another
    common.check_options(cfg, positive=[n for n in own if hasattr(cfg, n)],
                         ranges={"substitute": (0.0, 1.0), "gold_first": (0.0, 1.0)} if hasattr(cfg, "substitute") else None)
    if getattr(cfg, "group_size", 2) < 2:
        raise NanoError(f"--group_size must be at least 2: one relevant passage and a negative (got {cfg.group_size})")
    if cfg.chunk_overlap >= cfg.chunk_tokens:
        raise NanoError(f"--chunk_overlap {cfg.chunk_overlap} must be below --chunk_tokens {cfg.chunk_tokens}")
    for name in ("docs", "qa"):
        if not Path(getattr(cfg, name)).is_file():
            shipped = DOCS if name == "docs" else QA
            raise NanoError(f"--{name} {getattr(cfg, name)} not found (the shipped set: {shipped})")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise NanoError(f"--init_from {cfg.init_from} not found (a checkpoint; empty: pretrain the base)")
    common.check_out_dir(cfg.out_dir)


def fit(params, batch_loss, evaluate, save, cfg: TrainConfig, name: str) -> dict:
    """AdamW on `params` for max_iters steps of batch_loss(generator) -> scalar loss: warmup +
    cosine LR, clipping, a progress line with ETA every log_interval steps, evaluate() -> dict
    and save() every eval_interval steps, one metrics.jsonl row per step. Returns the last eval."""
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.jsonl", "w") as metrics:
        scores = evaluate()
        print(f"{name} iter 0: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        metrics.write(json.dumps({"iter": 0, **scores}) + "\n")
        t0 = time.time()
        for it in range(1, cfg.max_iters + 1):
            lr = common.cosine_lr(it - 1, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio,
                                  cfg.warmup_iters, cfg.max_iters)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = batch_loss(gen)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            row = {"iter": it, "loss": loss.item(), "lr": lr}
            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                eta = (time.time() - t0) / it * (cfg.max_iters - it)
                print(f"{name} iter {it}/{cfg.max_iters}: loss {row['loss']:.4f}, lr {lr:.2e}, ETA {eta:.0f}s")
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                scores = evaluate()
                row.update(scores)
                print(f"{name} iter {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                save(it)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
    return scores


def pretrain_base(cfg: BaseConfig) -> str:
    """out_dir/ckpt.pt: a GPT trained from scratch on the documents that no question of --qa asks
    about: the language the retrievers and the reader start from, and no fact they are trained or
    tested on (a base that had memorised the training people's facts would let the reranker and
    the reader answer from memory and never learn to read: they failed on unseen people)."""
    device = common.pick_device(cfg.device)
    tok = tokenizer.load_tokenizer(cfg.tokenizer)
    asked = {q["doc"] for q in read_qa(cfg.qa)}
    lines = [f"{title}: {text}" for doc, title, text, _ in read_docs([cfg.docs]) if doc not in asked]
    if len(lines) < 10:
        raise NanoError(f"{cfg.docs} has {len(lines)} documents that no question asks about (the base needs "
                        "some: give --init_from a checkpoint instead)")
    random.Random(cfg.seed).shuffle(lines)
    if cfg.repeat:  # the second copy is predictable only by copying from the first
        lines = [f"{line}\n{line}" for line in lines]
    ids = torch.tensor([t for line in lines for t in tok.encode(line) + [tok.eot_id]], dtype=torch.long)
    n_val = len(ids) // 10
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    T = cfg.block_size  # every position the reader's prompts reach is trained here
    config = gpt.GPTConfig(block_size=cfg.block_size, vocab_size=tok.vocab_size, n_layer=cfg.n_layer,
                           n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, rope_theta=cfg.rope_theta)
    common.set_seed(cfg.seed)
    model = gpt.GPT(config).to(device)
    print(f"base: {model.num_params() / 1e6:.2f}M parameters, {len(ids):,} tokens of {len(lines)} documents no "
          f"question asks about, {cfg.max_iters} iters of {cfg.batch_size} x {T}")

    def windows(source, gen, n):
        starts = torch.randint(len(source) - T - 1, (n,), generator=gen).tolist()
        xy = torch.stack([source[s:s + T + 1] for s in starts]).to(device)
        return xy[:, :-1], xy[:, 1:]

    def batch_loss(gen):
        model.train()
        return model(*windows(train_ids, gen, cfg.batch_size))[1]

    @torch.no_grad()
    def evaluate():
        model.eval()
        x, y = windows(val_ids, torch.Generator().manual_seed(0), 64)
        return {"val_loss": model(x, y)[1].item()}

    path = Path(cfg.out_dir) / "ckpt.pt"
    fit(list(model.parameters()), batch_loss, evaluate,
        lambda it: gpt.save_checkpoint(path, model, tok.spec, step=it), cfg, "base")
    print(f"saved {path}")
    print_next(["train_encoder", "--init_from", str(path)])
    return str(path)


def base_checkpoint(cfg: TrainConfig) -> str:
    """--init_from, or the shared base out_dir/../base/ckpt.pt (pretrained first if missing)."""
    if cfg.init_from:
        return cfg.init_from
    base_dir = Path(cfg.out_dir).parent / "base"
    if not (base_dir / "ckpt.pt").is_file():
        print(f"no base model at {base_dir / 'ckpt.pt'}: pretraining it (python rag.py pretrain --out_dir {base_dir})")
        pretrain_base(BaseConfig(docs=cfg.docs, qa=cfg.qa, out_dir=str(base_dir), device=cfg.device))
    return str(base_dir / "ckpt.pt")


def print_next(*commands):
    """The command(s) to run next, exactly as they run from the repository root."""
    print("next: " + " && ".join(shlex.join(["python", "rag.py", *c]) for c in commands))


def index_command(cfg: TrainConfig, encoder: str) -> list[str]:
    return ["index", cfg.docs, "--out", str(Path(cfg.out_dir).parent / "idx"), "--encoder", encoder]


def eval_commands(cfg: TrainConfig, **checkpoints) -> list[list[str]]:
    """eval on the index beside out_dir with this checkpoint and the others found there (the index
    built first when it is not there yet)."""
    out = Path(cfg.out_dir).parent
    found = {"encoder": out / "encoder" / "ckpt.pt", "reranker": out / "reranker" / "ckpt.pt",
             "generator": out / "generator" / "ckpt.pt"}
    paths = {k: str(v) for k, v in found.items() if v.is_file()} | checkpoints
    command = ["eval", str(out / "idx")] + [a for k in ("reranker", "generator") if k in paths for a in (f"--{k}", paths[k])]
    meta = out / "idx" / "meta.json"
    dense = meta.is_file() and json.loads(meta.read_text()).get("encoder")
    return ([] if dense or "encoder" not in paths else [index_command(cfg, paths["encoder"])]) + [command]


def load_base(cfg: TrainConfig, device):
    """(model, tokenizer, spec) of base_checkpoint(cfg)."""
    model, spec, _ = finetune.load_base(base_checkpoint(cfg), device)
    return model, tokenizer.load_tokenizer(spec), spec


@dataclass
class EncoderConfig(TrainConfig):
    """Train the bi-encoder: InfoNCE over (question, passage) pairs of the training split."""
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature tau"})
    hard_negatives: bool = field(default=True, metadata={"help": "add each question's best-ranked wrong BM25 chunk"})


def mine_negatives(chunks, questions, relevant, depth=30) -> list[list[int]]:
    """Each question's BM25 top `depth` without its relevant chunks: hard negatives, best first."""
    return [[d for d in ranked if d not in rel] for ranked, rel in
            zip(bm25_rankings(chunks, questions, depth), relevant)]


def train_encoder(cfg: EncoderConfig) -> str:
    device = common.pick_device(cfg.device)
    model, tok, spec = load_base(cfg, device)
    train, val = load_training_qa(cfg.docs, cfg.qa, tok, cfg.chunk_tokens, cfg.chunk_overlap)
    encoder = Encoder(model, tok, spec)
    passages = encoder.ids([c.passage() for c in train.chunks])
    questions = encoder.ids([q["question"] for q in train.questions])
    positives = [sorted(r) for r in train.relevant]
    negatives = mine_negatives(train.chunks, train.questions, train.relevant)
    print(f"encoder: {len(questions)} training questions, {len(val.questions)} validation questions, "
          f"{len(passages)} chunks; in-batch negatives" + (" + a BM25 hard negative each" * cfg.hard_negatives))

    def batch_loss(gen):
        model.train()
        pick = torch.randint(len(questions), (cfg.batch_size,), generator=gen).tolist()
        pos = [positives[i][torch.randint(len(positives[i]), (1,), generator=gen).item()] for i in pick]
        neg = [negatives[i][0] for i in pick if negatives[i]] if cfg.hard_negatives else []
        chunk_ids = torch.tensor(pos + neg, device=device)
        same = torch.tensor([[c in train.relevant[i] for c in pos + neg] for i in pick], device=device)
        q = encoder.forward([questions[i] for i in pick])
        p = encoder.forward([passages[c] for c in chunk_ids.tolist()])
        return info_nce(q, p, cfg.temperature, same)

    def evaluate():
        vectors = encoder.vectors([c.passage() for c in val.chunks])
        queries = encoder.vectors([q["question"] for q in val.questions])
        ranked = exact_search(vectors, queries, 10).indices.tolist()
        return {f"val_{k}": v for k, v in retrieval_metrics(ranked, val.relevant).items()}

    path = Path(cfg.out_dir) / "ckpt.pt"
    bm25 = retrieval_metrics(bm25_rankings(val.chunks, val.questions, 10), val.relevant)
    print(f"for reference, BM25 on the validation questions: recall@5 {bm25['recall@5']:.4f}, "
          f"nDCG@10 {bm25['ndcg@10']:.4f}")
    fit(list(model.parameters()), batch_loss, evaluate, lambda it: encoder.save(path, step=it), cfg, "encoder")
    print(f"saved {path}")
    print_next(index_command(cfg, str(path)))
    return str(path)


@dataclass
class RerankerConfig(TrainConfig):
    """Train the cross-encoder, starting from the bi-encoder: each question's relevant chunk against
    group_size - 1 hard negatives from the hybrid search it will rerank."""
    init_from: str = field(default="", metadata={
        "help": "the rag.py bi-encoder to start from and mine negatives with (empty: out_dir/../encoder/ckpt.pt, "
                "trained first when missing)"})
    out_dir: str = "out-rag/reranker"
    batch_size: int = field(default=8, metadata={"help": "questions per step (each with group_size passages)"})
    group_size: int = field(default=8, metadata={"help": "passages per question: 1 relevant + hard negatives"})
    rerank_k: int = field(default=20, metadata={"help": "validation: rerank the hybrid top k"})
    val_questions: int = field(default=64, metadata={"help": "validation questions per evaluation"})
    max_iters: int = 1500
    eval_interval: int = 250


def encoder_checkpoint(cfg: TrainConfig) -> str:
    """--init_from, or the bi-encoder beside out_dir (trained first, with the defaults, if missing)."""
    if cfg.init_from:
        return cfg.init_from
    path = Path(cfg.out_dir).parent / "encoder" / "ckpt.pt"
    if not path.is_file():
        print(f"no encoder at {path}: training it (python rag.py train_encoder --out_dir {path.parent})")
        train_encoder(EncoderConfig(docs=cfg.docs, qa=cfg.qa, out_dir=str(path.parent), device=cfg.device))
    return str(path)


def hybrid_rankings(encoder: Encoder, chunks, questions, depth: int) -> list[list[int]]:
    """RRF of BM25 and the encoder's exact search, each question's top `depth`."""
    vectors = encoder.vectors([c.passage() for c in chunks])
    dense = exact_search(vectors, encoder.vectors([q["question"] for q in questions]), depth).indices.tolist()
    bm25 = bm25_rankings(chunks, questions, depth)
    return [reciprocal_rank_fusion([b, d])[:depth] for b, d in zip(bm25, dense)]


def train_reranker(cfg: RerankerConfig) -> str:
    device = common.pick_device(cfg.device)
    encoder = Encoder.load(encoder_checkpoint(cfg), device)
    train, val = load_training_qa(cfg.docs, cfg.qa, encoder.tok, cfg.chunk_tokens, cfg.chunk_overlap)
    ranked = hybrid_rankings(encoder, train.chunks, train.questions, 3 * cfg.group_size)
    negatives = [[d for d in r if d not in rel] for r, rel in zip(ranked, train.relevant)]
    val_ranked = hybrid_rankings(encoder, val.chunks, val.questions[:cfg.val_questions], cfg.rerank_k)
    val_relevant = val.relevant[:cfg.val_questions]
    reranker = Reranker(encoder.model, encoder.tok, encoder.spec).to(device)  # mined: now it may change
    passages = [c.passage() for c in train.chunks]
    print(f"reranker: {len(train.questions)} training questions, groups of 1 relevant + {cfg.group_size - 1} "
          f"hybrid hard negatives; validation: the hybrid top {cfg.rerank_k} of {len(val_ranked)} questions reranked")

    def batch_loss(gen):
        reranker.train()
        rows = []
        for i in torch.randint(len(train.questions), (cfg.batch_size,), generator=gen).tolist():
            pool = negatives[i]
            negs = [pool[j] for j in torch.randperm(len(pool), generator=gen)[:cfg.group_size - 1].tolist()]
            negs += [d for d in torch.randint(len(passages), (cfg.group_size,), generator=gen).tolist()
                     if d not in train.relevant[i]][:cfg.group_size - 1 - len(negs)]  # too few: random ones
            pos = sorted(train.relevant[i])[torch.randint(len(train.relevant[i]), (1,), generator=gen).item()]
            rows += [reranker.pair_ids(train.questions[i]["question"], passages[d]) for d in [pos] + negs]
        return listwise_loss(reranker(rows).view(cfg.batch_size, cfg.group_size))

    def evaluate():
        scores = [reranker.scores(q["question"], [val.chunks[d].passage() for d in ranked])
                  for q, ranked in zip(val.questions, val_ranked)]
        fused = retrieval_metrics([rerank(r, s) for r, s in zip(val_ranked, scores)], val_relevant)
        alone = retrieval_metrics([[r[i] for i in top_k(s, len(s))] for r, s in zip(val_ranked, scores)], val_relevant)
        return {f"val_{k}": v for k, v in fused.items()} | {"val_alone_ndcg@10": alone["ndcg@10"]}

    hybrid = retrieval_metrics(val_ranked, val_relevant)
    print(f"for reference, hybrid alone: recall@5 {hybrid['recall@5']:.4f}, nDCG@10 {hybrid['ndcg@10']:.4f}")
    path = Path(cfg.out_dir) / "ckpt.pt"
    fit(list(reranker.parameters()), batch_loss, evaluate, lambda it: reranker.save(path, step=it), cfg, "reranker")
    print(f"saved {path}")
    print_next(*eval_commands(cfg, reranker=str(path)))
    return str(path)


# ----------------------------------------------------------------------------------------
# The reader: grounded SFT on prompt/response pairs (finetune.py's format; every weight trains:
# LoRA adapters on this 1M-parameter base learnt the task far slower, loss 2.4 vs 1.1 at step 200)


@dataclass
class GeneratorConfig(TrainConfig):
    """Grounded SFT of the reader: prompts of up to `passages` chunks (the relevant one among BM25
    hard negatives, in random order) and the question; the response is the answer and its id."""
    out_dir: str = "out-rag/generator"
    passages: int = field(default=3, metadata={"help": "passages per prompt (training: 1 to this many)"})
    substitute: float = field(default=1.0, metadata={
        "help": "share of training prompts whose answer is swapped for another of its kind (counterfactual)"})
    gold_first: float = field(default=0.7, metadata={
        "help": "share of prompts with the relevant passage first, as a good retriever ranks it (the others: "
                "anywhere), in [0, 1]"})
    batch_size: int = 16
    max_iters: int = 3500
    learning_rate: float = 2e-3
    warmup_iters: int = 100
    eval_interval: int = 500
    log_interval: int = 250
    val_questions: int = field(default=64, metadata={"help": "validation questions for exact match at each eval"})


def substitute_answer(chunk: Chunk, q: dict, new: str) -> Chunk:
    """The chunk with the question's answer span replaced by `new` (a counterfactual passage)."""
    start, end = q["start"] - chunk.start, q["end"] - chunk.start
    return Chunk(chunk.doc, chunk.title, chunk.start, chunk.end, chunk.text[:start] + new + chunk.text[end:])


def question_kind(q: dict, title: str) -> str:
    """The question with its person's name taken out: "Where was {} born?" (its template)."""
    return q["question"].replace(title, "{}")


def grounded_example(qa_data: QAData, i: int, negatives, n_passages: int, substitute: float, rng,
                     answers_of_kind=None, gold_first: float = 0.0) -> dict:
    """{"prompt", "response"} for question i: its relevant chunk among BM25 hard negatives, first
    with probability gold_first (as a good retriever ranks it), else at a random place; the
    response " <answer> [<its place>]". With probability `substitute` the answer is
    swapped, in the passage and the response, for the answer of another question of its kind
    (answers_of_kind: question_kind -> answers; a job for a job): the reader cannot give those
    from facts it memorised, only by reading (the counterfactual contexts of Longpre et al. 2021,
    arXiv:2109.05052), and the kind of the answer still tells which sentence holds it."""
    q, rel = qa_data.questions[i], qa_data.relevant[i]
    gold, negs = rng.choice(sorted(rel)), negatives[i][:10]
    chosen = rng.sample(negs, min(n_passages - 1, len(negs)))
    chosen.insert(0 if rng.random() < gold_first else rng.randint(0, len(chosen)), gold)
    passages = {d: qa_data.chunks[d] for d in chosen}
    answer = q["answer"]
    if answers_of_kind and rng.random() < substitute:
        answer = rng.choice(answers_of_kind[question_kind(q, passages[gold].title)])
        passages[gold] = substitute_answer(passages[gold], q, answer)
    return {"prompt": grounded_prompt(q["question"], [passages[d].passage() for d in chosen]),
            "response": grounded_response(answer, chosen.index(gold) + 1)}


def sft_batch(tok, examples, block_size: int, device):
    """(x, y) of prompt/response pairs as finetune.py trains them: the loss on the response and
    the end-of-text token after it only (targets -1 elsewhere), right-padded."""
    rows, targets = [], []
    for ex in examples:
        prompt, response = tok.encode(ex["prompt"]), tok.encode(ex["response"]) + [tok.eot_id]
        ids = (prompt + response)[-(block_size + 1):]  # a long prompt loses its start, never the answer
        rows.append(ids[:-1])
        targets.append([-1] * (len(ids) - 1 - len(response)) + response)
    x, mask = pad_batch(rows, device)
    y = torch.full(x.shape, -1, dtype=torch.long)
    for r, t in enumerate(targets):
        y[r, :len(t)] = torch.tensor(t)
    return x, y.to(device)


def train_generator(cfg: GeneratorConfig) -> str:
    """Grounded SFT: every weight of the base trains on prompts drawn afresh at each step (1 to
    `passages` passages, counterfactual answers: nothing to memorise), the loss on the response.
    The validation prompts (exactly `passages` passages, true answers) go to out_dir/val.jsonl in
    finetune.py's prompt/response format; each evaluation prints their loss and exact match."""
    device = common.pick_device(cfg.device)
    model, tok, spec = load_base(cfg, device)
    train, val = load_training_qa(cfg.docs, cfg.qa, tok, cfg.chunk_tokens, cfg.chunk_overlap)
    negatives = mine_negatives(train.chunks, train.questions, train.relevant)
    val_negatives = mine_negatives(val.chunks, val.questions, val.relevant)
    kinds = {}
    for q, rel in zip(train.questions, train.relevant):
        kinds.setdefault(question_kind(q, train.chunks[min(rel)].title), []).append(q["answer"])
    numbers = [a for answers in kinds.values() for a in answers if a.isdigit()]
    for answers in kinds.values():  # a rare kind ("How many ponies does {} keep?") borrows any number
        if len(set(answers)) < 5 and answers[0].isdigit():
            answers += numbers
    rng = random.Random(cfg.seed)
    val_rows = [grounded_example(val, i, val_negatives, cfg.passages, 0.0, rng, gold_first=cfg.gold_first)
                for i in range(min(cfg.val_questions, len(val.questions)))]
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common.atomic_write(out_dir / "val.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in val_rows)))
    print(f"generator: {len(train.questions)} training questions, prompts of 1-{cfg.passages} passages drawn at each "
          f"step ({100 * cfg.substitute:.0f}% counterfactual); {len(val_rows)} validation prompts in "
          f"{out_dir / 'val.jsonl'}, e.g.\n{val_rows[0]['prompt']}{val_rows[0]['response']}")
    block = model.config.block_size

    def batch_loss(gen):
        model.train()
        picks = torch.randint(len(train.questions), (cfg.batch_size,), generator=gen).tolist()
        examples = [grounded_example(train, i, negatives, rng.randint(1, cfg.passages), cfg.substitute, rng, kinds,
                                     cfg.gold_first) for i in picks]  # one passage sometimes: copying is learnt first, choosing builds on it
        return model(*sft_batch(tok, examples, block, device))[1]

    @torch.no_grad()
    def evaluate():
        model.eval()
        val_loss = model(*sft_batch(tok, val_rows, block, device))[1].item()
        answers = generate_answers(model, tok, [r["prompt"] for r in val_rows])
        em = sum(split_citations(a) == split_citations(r["response"]) for a, r in zip(answers, val_rows))
        return {"val_loss": val_loss, "val_exact_match": em / len(val_rows)}

    path = out_dir / "ckpt.pt"
    fit(list(model.parameters()), batch_loss, evaluate,
        lambda it: gpt.save_checkpoint(path, model, spec, step=it, rag="generator"), cfg, "generator")
    print(f"saved {path}")
    print_next(*eval_commands(cfg, generator=str(path)))
    return str(path)


# ----------------------------------------------------------------------------------------
# Evaluation on the shipped test questions, and asking


@dataclass
class EvalConfig:
    qa: str = field(default=str(QA), metadata={"help": "questions with their answers' offsets"})
    split: str = field(default="test", metadata={"help": "which questions of --qa"})
    encoder: str = field(default="", metadata={"help": "query encoder (empty: the index's)"})
    reranker: str = field(default="", metadata={"help": "a rag.py reranker checkpoint: adds '+ reranker' rows"})
    generator: str = field(default="", metadata={"help": "a grounded reader (train_generator's ckpt.pt): "
                                                        "exact match without and with retrieval"})
    rerank_k: int = field(default=20, metadata={"help": "the reranker reorders this many of the top"})
    passages: int = field(default=3, metadata={"help": "passages in the reader's prompt"})
    quote: bool = field(default=True, metadata={
        "help": "the reader's answer quotes whole words of its passages (constrained decoding, see generate_answers): "
                "80.5% exact match on the test questions vs 55.7% free (false)"})
    nprobe: int = field(default=0, metadata={"help": "dense search: 0 exact, else IVF probing this many cells"})
    limit: int = field(default=0, metadata={"help": "evaluate the first N questions only (0: all)"})
    out_json: str = field(default="", metadata={"help": "also write the figures here"})
    device: str = "auto"


def load_retriever(folder, encoder: str, reranker: str, device, **kwargs) -> Retriever:
    """An index with its encoder (--encoder overrides the one it was built with) and reranker."""
    index = Index.load(folder)
    encoder = encoder or index.meta.get("encoder") or ""
    for path, what in ((encoder, "--encoder"), (reranker, "--reranker")):
        if path and not Path(path).is_file():
            raise NanoError(f"{what} {path} not found (train it: python rag.py train_{what[2:]})")
    enc = Encoder.load(encoder, device) if encoder else None
    if enc is not None and index.vectors is not None and enc.dim != index.vectors.shape[1]:
        raise NanoError(f"--encoder {encoder} makes {enc.dim}-d vectors, the index holds {index.vectors.shape[1]}-d "
                        "(use the encoder the index was built with)")
    return Retriever(index, enc, Reranker.load(reranker, device) if reranker else None, **kwargs)


def reader_scores(model, tok, questions, passages_of, relevant_of, quote=True, batch_size=32) -> dict:
    """Exact match of the reader's answers, and of the correct ones the share whose first citation
    points at a passage that holds the answer. passages_of(i) -> [(chunk id, passage)]."""
    hits, cited = 0, 0
    for s in range(0, len(questions), batch_size):
        batch = range(s, min(s + batch_size, len(questions)))
        texts = [[p for _, p in passages_of(i)] for i in batch]
        prompts = [grounded_prompt(questions[i]["question"], ps) for i, ps in zip(batch, texts)]
        for i, out in zip(batch, generate_answers(model, tok, prompts, passages=texts if quote else None)):
            answer, cites = split_citations(out)
            if normalize_answer(answer) == normalize_answer(questions[i]["answer"]):
                hits += 1
                shown = passages_of(i)
                cited += bool(cites) and 1 <= cites[0] <= len(shown) and shown[cites[0] - 1][0] in relevant_of(i)
    return {"exact_match": hits / len(questions), "citation_precision": cited / max(hits, 1)}


def run_eval(args, cfg: EvalConfig) -> dict:
    """Retrieval metrics of every method the index supports, then the reader without and with retrieval."""
    device = common.pick_device(cfg.device)
    retriever = load_retriever(args[0], cfg.encoder, "", device, nprobe=cfg.nprobe, rerank_k=cfg.rerank_k)
    questions = [q for q in read_qa(cfg.qa) if q["split"] == cfg.split][:cfg.limit or None]
    if not questions:
        raise NanoError(f"{cfg.qa} has no questions with split {cfg.split!r}")
    chunks = retriever.index.chunks(range(len(retriever.index)))  # every span, to judge relevance
    relevant = relevant_chunks(questions, chunks)
    methods = ["bm25"] + (["dense", "hybrid"] if retriever.encoder and retriever.index.vectors is not None else [])
    t0, results, rankings = time.time(), {}, {}
    for method in methods + (["reranked"] if cfg.reranker else []):
        if method == "reranked":
            retriever.reranker, method = Reranker.load(cfg.reranker, device), f"{methods[-1]} + reranker"
        progress = Progress(f"eval {method}", len(questions), " questions")
        rankings[method] = []
        for i, q in enumerate(questions):
            rankings[method].append(retriever.search(q["question"], method.split(" +")[0], 10))
            progress.update(i + 1)
        progress.close(len(questions))
        results[method] = retrieval_metrics(rankings[method], relevant)
    print(f"{len(questions)} {cfg.split} questions, {len(chunks)} chunks ({time.time() - t0:.0f} s):")
    print(f"{'retrieval':<28} {'recall@5':>9} {'nDCG@10':>9}")
    for method, m in results.items():
        print(f"{method:<28} {m['recall@5']:>9.4f} {m['ndcg@10']:>9.4f}")
    if cfg.generator:
        results["reader"] = eval_reader(cfg, device, questions, relevant, rankings[list(rankings)[-1]], chunks,
                                        list(rankings)[-1])
    if cfg.out_json:
        common.atomic_write(Path(cfg.out_json), lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    return results


def eval_reader(cfg, device, questions, relevant, ranked, chunks, method) -> dict:
    if not Path(cfg.generator).is_file():
        raise NanoError(f"--generator {cfg.generator} not found (train it: python rag.py train_generator)")
    model, spec = gpt.load_checkpoint(cfg.generator, device)
    tok = tokenizer.load_tokenizer(spec)
    closed = reader_scores(model, tok, questions, lambda i: [], lambda i: relevant[i])
    top = lambda i: [(d, chunks[d].passage()) for d in ranked[i][:cfg.passages]]  # noqa: E731
    opened = reader_scores(model, tok, questions, top, lambda i: relevant[i], quote=cfg.quote)
    print(f"{'reader':<28} {'exact match':>12} {'citations right':>16}")
    print(f"{'no retrieval':<28} {100 * closed['exact_match']:>11.1f}% {'-':>16}")
    print(f"{f'top {cfg.passages} of {method}':<28} {100 * opened['exact_match']:>11.1f}% "
          f"{100 * opened['citation_precision']:>15.1f}%")
    return {"no_retrieval": closed, "with_retrieval": opened}


@dataclass
class AskConfig:
    k: int = field(default=3, metadata={"help": "passages shown (and given to the generator)"})
    method: str = field(default="auto", metadata={"help": "bm25, dense, hybrid (auto: hybrid with an encoder)"})
    encoder: str = field(default="", metadata={"help": "query encoder (empty: the index's)"})
    reranker: str = field(default="", metadata={"help": "a rag.py reranker checkpoint"})
    generator: str = field(default="", metadata={"help": "a grounded reader: answer with citations"})
    quote: bool = field(default=True, metadata={"help": "the answer quotes the passages (false: free decoding)"})
    rerank_k: int = 20
    nprobe: int = field(default=0, metadata={"help": "dense search: 0 exact, else IVF probing this many cells"})
    device: str = "auto"


def run_ask(args, cfg: AskConfig) -> dict:
    folder, question = args
    device = common.pick_device(cfg.device)
    retriever = load_retriever(folder, cfg.encoder, cfg.reranker, device, nprobe=cfg.nprobe, rerank_k=cfg.rerank_k)
    method = cfg.method if cfg.method != "auto" else "hybrid" if retriever.encoder else "bm25"
    chunks = retriever.index.chunks(retriever.search(question, method, cfg.k))
    print(f"top {len(chunks)} of {len(retriever.index):,} chunks ({method}"
          f"{' + reranker' if retriever.reranker else ''}):")
    for i, c in enumerate(chunks, 1):
        print(f"[{i}] {c.passage()}\n    ({c.doc}, characters {c.start}-{c.end})")
    result = {"passages": [asdict(c) for c in chunks]}
    if cfg.generator:
        if not Path(cfg.generator).is_file():
            raise NanoError(f"--generator {cfg.generator} not found (train it: python rag.py train_generator)")
        model, spec = gpt.load_checkpoint(cfg.generator, device)
        texts = [c.passage() for c in chunks]
        out = generate_answers(model, tokenizer.load_tokenizer(spec), [grounded_prompt(question, texts)],
                               passages=[texts] if cfg.quote else None)[0]
        answer, cites = split_citations(out)
        sources = [f"[{n}] {chunks[n - 1].doc} characters {chunks[n - 1].start}-{chunks[n - 1].end}"
                   for n in cites if 1 <= n <= len(chunks)]
        print(f"answer: {answer}" + (f"  (source: {'; '.join(sources)})" if sources else "  (no valid citation)"))
        result.update(answer=answer, citations=cites)
    return result


@dataclass
class PipelineConfig:
    out: str = field(default="out-rag", metadata={"help": "the folder of base/, encoder/, reranker/, generator/, idx/"})
    retrain: bool = field(default=False, metadata={"help": "train the encoder, reranker and generator again even "
                                                           "where their checkpoints exist"})
    limit: int = field(default=0, metadata={"help": "evaluate the first N test questions only (0: all)"})
    device: str = "auto"


def run_pipeline(args, cfg: PipelineConfig) -> dict:
    """Every step with its defaults on the shipped set, a step skipped where its checkpoint exists:
    the base (pretrained on first use), encoder, reranker, reader, the index, then eval's table."""
    out, t0 = Path(cfg.out), time.time()
    trainers = {"encoder": (EncoderConfig, train_encoder), "reranker": (RerankerConfig, train_reranker),
                "generator": (GeneratorConfig, train_generator)}
    paths = {}
    for name, (config_cls, train) in trainers.items():
        path = out / name / "ckpt.pt"
        if cfg.retrain or not path.is_file():
            config = config_cls(out_dir=str(out / name), device=cfg.device)
            check_train_config(config)
            train(config)
        paths[name] = str(path)
    run_index([str(DOCS)], IndexConfig(out=str(out / "idx"), encoder=paths["encoder"], device=cfg.device))
    results = run_eval([str(out / "idx")], EvalConfig(reranker=paths["reranker"], generator=paths["generator"],
                                                      limit=cfg.limit, out_json=str(out / "eval.json"),
                                                      device=cfg.device))
    print(f"pipeline: {time.time() - t0:.0f} s (figures in {out / 'eval.json'})")
    return results


# ----------------------------------------------------------------------------------------
# Building an index, and the CLI


def check_index_config(paths, cfg: IndexConfig):
    common.check_options(cfg, positive=("chunk_tokens", "batch_size"), non_negative=("chunk_overlap", "k1", "nlist"),
                         ranges={"b": (0.0, 1.0)})
    if cfg.chunk_overlap >= cfg.chunk_tokens:
        raise NanoError(f"--chunk_overlap {cfg.chunk_overlap} must be below --chunk_tokens {cfg.chunk_tokens}")
    if cfg.bm25_terms not in ("words", "tokens"):
        raise NanoError(f"--bm25_terms must be words or tokens (got {cfg.bm25_terms!r})")
    if not paths:
        raise NanoError("no documents given (python rag.py index DOCS... --out idx/; .jsonl or text files)")
    for p in map(Path, paths):
        if not p.is_file():
            raise NanoError(f"{p} is {'a folder' if p.is_dir() else 'not found'} (give files: {p}/*.txt)")
    if cfg.encoder and not Path(cfg.encoder).is_file():
        raise NanoError(f"--encoder {cfg.encoder} not found (train one: python rag.py train_encoder)")
    out = Path(cfg.out)
    if cfg.add and not (out / "meta.json").is_file():
        raise NanoError(f"--add: {out} is not an index yet (build it first without --add)")
    if not cfg.add and out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise NanoError(f"--out {out} is a folder that holds something else than an index (choose another)")
    if out.exists() and not out.is_dir():
        raise NanoError(f"--out {out} is a file (give a folder)")


def new_index(folder, cfg: IndexConfig, encoder_path: str) -> Index:
    meta = {"tokenizer": cfg.tokenizer, "chunk_tokens": cfg.chunk_tokens, "chunk_overlap": cfg.chunk_overlap,
            "bm25_terms": cfg.bm25_terms, "encoder": str(Path(encoder_path).resolve()) if encoder_path else "",
            "nlist": cfg.nlist}
    Path(folder).mkdir(parents=True)
    (Path(folder) / "chunks.jsonl").touch()
    return Index(folder, meta, BM25(cfg.k1, cfg.b))


def run_index(paths, cfg: IndexConfig) -> Index:
    """Build a fresh index in a temp folder, then swap it in (a kill leaves the old one), or add
    the documents to the index at --out in place."""
    check_index_config(paths, cfg)
    device = common.pick_device(cfg.device)
    out, t0 = Path(cfg.out), time.time()
    if cfg.add:
        index = Index.load(out)
        n_before = len(index)
    else:
        common.remove_stale_temps(out, tags=("tmp", "old"))
        index, n_before = new_index(out.with_name(f".{out.name}.tmp{os.getpid()}"), cfg, cfg.encoder), 0
    tok = tokenizer.load_tokenizer(index.meta["tokenizer"])
    encoder = Encoder.load(index.meta["encoder"], device) if index.meta["encoder"] else None
    n = index.add(paths, tok, encoder, cfg.batch_size)
    index.save()
    if not cfg.add:
        swap_folder(index.folder, out)
        index.folder = out
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"{'added' if cfg.add else 'indexed'} {n:,} chunks ({n_before + n:,} in all, BM25 vocabulary "
          f"{len(index.bm25.vocab):,}{', dense vectors + IVF' if encoder else ''}) in {time.time() - t0:.1f} s: "
          f"{out} ({size:.1f} MB)")
    if encoder is not None and len(index) >= 100:
        queries = index.vectors[torch.randperm(len(index), generator=torch.Generator().manual_seed(0))[:100]]
        rows = ivf_tradeoff(index.ivf, index.vectors, queries)
        for nprobe, rec, speedup in rows:
            print(f"IVF {len(index.ivf.centroids)} cells, nprobe {nprobe:>3}: recall@10 vs exact {rec:.3f}, "
                  f"{speedup:.1f}x exact's speed (100 of the chunks as queries)")
        if max(r[2] for r in rows) < 1:
            print(f"(exact search of {len(index):,} vectors is one small product: IVF pays off near 10^5 vectors, "
                  "bench's rag section; ask searches exactly unless given --nprobe)")
    first = index.chunks([0])[0]
    shipped = first.title == "Fosvou Geltonbrem"  # the shipped documents: a question of the QA set
    example = "Where was Fosvou Geltonbrem born?" if shipped else first.title or first.text[:60]
    print_next(["ask", str(out), example])
    return index


def swap_folder(new: Path, dest: Path):
    """Replace dest by new: dest is renamed aside first, so a kill between leaves one of them."""
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    if old.exists():
        shutil.rmtree(old)


COMMANDS = {  # name: (positional arguments, config, run, what it does)
    "index": ("DOCS...", IndexConfig, run_index, "chunk documents (.jsonl of {id, title, text}, or text files) "
              "into a BM25 index (+ dense vectors and IVF with --encoder)"),
    "ask": ("INDEX QUESTION", AskConfig, run_ask, "the top passages for a question (and with --generator an "
            "answer citing them)"),
    "pretrain": ("", BaseConfig, pretrain_base, "pretrain the shared base GPT on the documents no question asks about"),
    "train_encoder": ("", EncoderConfig, train_encoder, "train the bi-encoder (dense retriever), InfoNCE"),
    "train_reranker": ("", RerankerConfig, train_reranker, "train the cross-encoder reranker, listwise"),
    "train_generator": ("", GeneratorConfig, train_generator, "grounded SFT of the reader on prompt/response pairs"),
    "eval": ("INDEX", EvalConfig, run_eval, "recall@5 / nDCG@10 of each retriever, the reader's exact match "
             "without and with retrieval"),
    "pipeline": ("", PipelineConfig, run_pipeline, "all of it with the defaults (each step skipped where its "
                 "checkpoint exists), then eval's table"),
}


@common.cli
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\ncommands (each has --help):\n"
              + "\n".join(f"  python rag.py {name} {pos}".rstrip() + f"\n      {what}"
                          for name, (pos, _, _, what) in COMMANDS.items()))
        return None
    name = argv[0]
    if name not in COMMANDS:
        raise NanoError(f"unknown command {name!r} (one of {', '.join(COMMANDS)}; python rag.py --help)")
    positional, config_cls, run, what = COMMANDS[name]
    n_pos = next((i for i, a in enumerate(argv[1:]) if a.startswith("-")), len(argv) - 1)
    args, options = argv[1:1 + n_pos], argv[1 + n_pos:]
    cfg = common.parse_config(config_cls, options, f"python rag.py {name} {positional} [options]: {what}")
    wanted = positional.split()
    if (wanted == ["DOCS..."] and not args) or (wanted != ["DOCS..."] and len(args) != len(wanted)):
        raise NanoError(f"python rag.py {name} takes {positional or 'no positional arguments'} before its options "
                        f"(got {len(args)}: {' '.join(args)[:80]})")
    if isinstance(cfg, TrainConfig):
        check_train_config(cfg)
        return run(cfg)
    return run(args, cfg)


if __name__ == "__main__":
    main()
