"""Issue 12: dump, per RULER document, everything a query-agnostic scorer could use, plus where the answers are,
so scorers can be compared offline by how many (layer, head) keep the answer tokens (no generation).

    python scripts/experiments/score_dump.py TASKS N_PER_TASK LENGTHS OUTDIR [SEED]

Per document OUTDIR/<id>.npz: ev_all / ev_window / ev_reconstruct (float32[L, H, N]), surprisal (float32[N]:
-log p(token | previous) on the full document, 0 for the first), knorm / vnorm (float32[L, H, N]), tokens,
and for each question q: val_q (value token indices) and sent_q (needle sentence token indices).
"""
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import numpy as np  # noqa: E402

from kvmerge_local.engine import Session  # noqa: E402
from kvmerge_local.engine.cache import float_views  # noqa: E402
from kvmerge_local.models import default_document_model  # noqa: E402
from kvmerge_local.quality import ruler, suite  # noqa: E402
from kvmerge_local.quality.perplexity import token_nll  # noqa: E402


def char_offsets(s):
    text, offs = b"", []
    for t in s.cache.tokens:
        offs.append(len(text))
        text += s.model.piece(int(t))
    return text.decode("utf-8", "replace"), np.array(offs)


def spans(text, offs, q):
    val, sent = [], []
    for a in q["answer"]:
        i = text.find(a)
        if i < 0:
            continue
        j = text.rfind("One of the special magic", 0, i)
        j = i if j < 0 or i - j > 200 else j
        val += np.nonzero((offs >= i) & (offs < i + len(a)))[0].tolist()
        sent += np.nonzero((offs >= j) & (offs < i + len(a) + 1))[0].tolist()
    return np.array(sorted(set(val)), np.int64), np.array(sorted(set(sent)), np.int64)


def question_evidence(s, n, q):
    """float32[L, H, n]: the attention question ``q`` (chat layout, answer cue) gives the n document cells
    now cached (the query-aware oracle); the cache is left as it was."""
    s.reset_chat()
    question, prefix = suite._split_question(q["question"])
    tq, _ = s.chat.question(question, prefix=" " + prefix if prefix else "")
    s.bridge.enable_evidence(0)
    s.bridge.reset_evidence()
    try:
        s.ctx.decode(tq, logits="none")
        return s.bridge.evidence(below=n)
    finally:
        s.bridge.disable_evidence()
        s.bridge.remove_from(n)


def surprisal(s, toks):
    s.bridge.remove_from(0)
    out = np.zeros(len(toks), np.float32)
    nb = s.ctx.n_batch
    for i in range(0, len(toks), nb):
        lg = s.ctx.decode(toks[i:i + nb], logits="all")
        nxt = toks[i + 1:i + 1 + len(lg)]
        out[i + 1:i + 1 + len(nxt)] = token_nll(lg[:len(nxt)], nxt)
    return out


def main():
    tasks, n, lens, outdir = tuple(sys.argv[1].split(",")), int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], \
        sys.argv[4]
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 11
    os.makedirs(outdir, exist_ok=True)
    with Session.open(str(default_document_model()), n_ctx=max(lens) + 640, n_threads=2) as s:
        docs = ruler.generate(n, lens, seed, lambda t: len(s.model.tokenize(t)), tasks=tasks)
        for d in docs:
            t0 = time.time()
            prep = suite.prepare(s, d["context"], need_replay=True)
            k, v = float_views(prep.state)
            arrs = {"ev_" + kk: vv for kk, vv in prep.evidence.items() if vv is not None}
            arrs["knorm"] = np.linalg.norm(k, axis=-1).astype(np.float32)
            arrs["vnorm"] = np.linalg.norm(v, axis=-1).astype(np.float32)
            toks = np.asarray(s.cache.tokens, np.int32)
            arrs["tokens"] = toks
            text, offs = char_offsets(s)
            for qi, q in enumerate(d["questions"]):
                arrs[f"val_{qi}"], arrs[f"sent_{qi}"] = spans(text, offs, q)
            n = len(toks)
            for qi, q in enumerate(d["questions"]):  # query-aware evidence: the question's own attention
                arrs[f"evq_{qi}"] = question_evidence(s, len(toks), q)
            arrs["surprisal"] = surprisal(s, toks)
            s.bridge.write(prep.state)
            np.savez_compressed(os.path.join(outdir, d["id"] + ".npz"), **arrs)
            json.dump({kk: vv for kk, vv in d.items() if kk != "context"}, open(os.path.join(outdir, d["id"] + ".json"), "w"))
            print(d["id"], len(toks), "%.1fs" % (time.time() - t0), flush=True)


if __name__ == "__main__":
    main()
