"""bench rag: IVF against exact search at 100k vectors, BM25 indexing speed, and the retrieval /
reader table on the shipped test questions (`python -m bench rag`)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import rag
from .util import row

OUT = Path("out-rag")


def clustered_vectors(n: int, dim: int, n_clusters: int, noise: float, generator) -> torch.Tensor:
    """Unit vectors around n_clusters random centres (embeddings cluster by topic; uniform random
    vectors would be the worst case of any IVF)."""
    centres = F.normalize(torch.randn(n_clusters, dim, generator=generator), dim=1)
    x = centres[torch.randint(n_clusters, (n,), generator=generator)]
    return F.normalize(x + noise * torch.randn(n, dim, generator=generator) / dim ** 0.5, dim=1)


def bench_ivf(quick: bool):
    n, dim = (5_000, 64) if quick else (100_000, 64)
    g = torch.Generator().manual_seed(0)
    vectors = clustered_vectors(n + 200, dim, 1000, 1.0, g)
    vectors, queries = vectors[:n], vectors[n:]
    t0 = time.perf_counter()
    ivf = rag.IVF.build(vectors)
    build_s = time.perf_counter() - t0
    what = f"{n // 1000}k x {dim}-d, {len(ivf.centroids)} cells"
    row("rag", f"IVF build (k-means on {what})", f"{build_s:.1f} s")
    for nprobe, recall, speedup in rag.ivf_tradeoff(ivf, vectors, queries[:50 if quick else 200], (1, 4, 16, 32, 64)):
        row("rag", f"IVF nprobe {nprobe:>2} ({what}): recall@10 vs exact, speed-up",
            f"{recall:.3f}, {speedup:.1f}x exact (one query at a time)")


def bench_index_speed(quick: bool):
    """Index a corpus of `mb` megabytes (the shipped documents repeated, each copy its own id)."""
    mb = 1 if quick else 50
    docs = rag.DOCS.read_text(encoding="utf-8").splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with corpus.open("w", encoding="utf-8") as f:
            written, copy = 0, 0
            while written < mb * 1e6:
                for line in docs:
                    doc = json.loads(line)
                    doc["id"] = f"{doc['id']}-{copy}"
                    written += f.write(json.dumps(doc) + "\n")
                copy += 1
        size = corpus.stat().st_size / 1e6
        t0 = time.perf_counter()
        index = rag.run_index([str(corpus)], rag.IndexConfig(out=str(Path(tmp) / "idx")))
        seconds = time.perf_counter() - t0
        row("rag", f"BM25 index of a {size:.0f} MB .jsonl ({len(index):,} chunks of 32 tokens)",
            f"{seconds:.1f} s = {size / seconds:.2f} MB/s, peak RSS {common.peak_memory_mib('cpu'):,.0f} MiB")
        question = "Where was Fosvou Geltonbrem born?"
        retriever = rag.Retriever(rag.Index.load(index.folder))
        ms = common.median_ms(lambda: retriever.search(question, "bm25", 10), repeat=5)
        row("rag", f"BM25 query over {len(index):,} chunks", f"{ms:.1f} ms")


def trained(name: str, quick: bool, tmp: Path) -> str:
    """out-rag/<name>'s checkpoint (trained with rag.py's defaults if missing); --quick: 2 steps."""
    cls = {"encoder": rag.EncoderConfig, "reranker": rag.RerankerConfig, "generator": rag.GeneratorConfig}[name]
    out = (tmp if quick else OUT) / name
    if not quick and (out / "ckpt.pt").is_file():
        return str(out / "ckpt.pt")
    small = dict(max_iters=2, eval_interval=2, log_interval=1) if quick else {}
    if quick and not (tmp / "base" / "ckpt.pt").is_file():
        rag.pretrain_base(rag.BaseConfig(out_dir=str(tmp / "base"), max_iters=2, eval_interval=2, log_interval=1))
    train = {"encoder": rag.train_encoder, "reranker": rag.train_reranker, "generator": rag.train_generator}[name]
    return train(cls(out_dir=str(out), **small, **({"val_questions": 4} if name != "encoder" else {})))


def bench_quality(quick: bool):
    """The table of the issue: recall@5 / nDCG@10 of BM25, dense, hybrid, hybrid + reranker on
    the test questions, and the reader's exact match without and with retrieval."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        encoder, reranker, generator = (trained(n, quick, tmp) for n in ("encoder", "reranker", "generator"))
        index = tmp / "idx"
        rag.run_index([str(rag.DOCS)], rag.IndexConfig(out=str(index), encoder=encoder))
        results = rag.run_eval([str(index)], rag.EvalConfig(reranker=reranker, generator=generator,
                                                            limit=20 if quick else 0))
    for method, m in results.items():
        if method != "reader":
            row("rag", f"{method}: recall@5, nDCG@10 (test questions)", f"{m['recall@5']:.3f}, {m['ndcg@10']:.3f}")
    reader = results["reader"]
    row("rag", "reader exact match: no retrieval / top 3 of hybrid + reranker",
        f"{100 * reader['no_retrieval']['exact_match']:.1f}% / {100 * reader['with_retrieval']['exact_match']:.1f}%")
    row("rag", "correct answers whose citation holds the answer",
        f"{100 * reader['with_retrieval']['citation_precision']:.1f}%")


def bench_rag(quick: bool) -> None:
    bench_ivf(quick)
    bench_index_speed(quick)
    bench_quality(quick)

