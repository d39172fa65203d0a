"""Issue 12 dev metric: teacher-forced answer log-likelihood after compression (paired with the full cache).

Exact-match retention on a 135M model rests on ~20 answered questions, so methods cannot be told apart. Here
every question counts: after compressing the document, the question (chat prompt + RULER answer cue) and the
GOLD answer are decoded in one call and we read, per answer token, the log-probability and whether it is the
argmax.  Reported per config, paired with the full cache on the same questions:
  - dNLL: mean over questions of (answer NLL per token, method - full), with a bootstrap 95% CI;
  - tf-acc: fraction of answer tokens that are the argmax (teacher forced), and the full cache's;
  - whole: fraction of questions whose every answer token is the argmax (a greedy exact match, nearly);
  - kept: for needle tasks, the mean fraction of (layer, head) that keep the answer's value tokens.

    python scripts/experiments/answer_nll.py CONFIGS TASKS N_PER_TASK LENGTHS OUT.json [SEED]
    python scripts/experiments/answer_nll.py kvzip@0.5,streaming_llm@0.5 niah_single,niah_multikey 4 1024 o.json
"""
import collections
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))
import numpy as np  # noqa: E402

from kvmerge_local.engine import Session  # noqa: E402
from kvmerge_local.engine.replay import FIRST_PROMPT, LATER_PROMPT, replay_prompt, replay_scores  # noqa: E402
from kvmerge_local.models import default_document_model  # noqa: E402
from kvmerge_local.quality import ruler, suite  # noqa: E402
from kvmerge_local.quality.harness import make_method  # noqa: E402
from score_dump import char_offsets, question_evidence, spans  # noqa: E402


def variants():
    try:
        import nll_variants  # noqa: PLC0415
        return nll_variants.VARIANTS
    except ImportError:
        return {}


def native_evict(s, prep, method, b):
    """The same (token-level) selection applied by llama.cpp's own seq_rm, one evicted position at a time
    (positions kept): the reference our compaction must match."""
    s.reset_chat()
    s.bridge.write(prep.state)
    L, H, N = prep.doc_pos.shape
    ev = prep.evidence[method.evidence_kind]
    m = int(b * N)
    keep = method.select(np.zeros((L, H, N, 1), np.float32), None, prep.doc_pos, ev, m)[0, 0]
    drop = np.setdiff1d(np.arange(N), keep)
    for p in drop.tolist():
        s.bridge.remove_from(p, p + 1)
    s.cache.doc_pos = np.broadcast_to(keep.astype(np.int32), (L, H, m)).copy()


def parse_configs(text):
    V = variants()
    out = []
    for c in text.split(","):
        name, b = c.split("@") if "@" in c else (c, "1")
        out.append((f"{name}@{b}", V[name]() if name in V else make_method(name), float(b)))
    return out


def main():
    confs = [("full@1", make_method("full"), 1.0)] + parse_configs(sys.argv[1])
    tasks, n, lens, out = tuple(sys.argv[2].split(",")), int(sys.argv[3]), [int(x) for x in sys.argv[4].split(",")], \
        sys.argv[5]
    seed = int(sys.argv[6]) if len(sys.argv) > 6 else 11
    rows = []
    need = {m.evidence_kind for _, m, _ in confs}
    with Session.open(str(default_document_model()), n_ctx=max(lens) + 640, n_threads=2,
                      kv_type=os.environ.get("KV_TYPE", "f16")) as s:
        docs = ruler.generate(n, lens, seed, lambda t: len(s.model.tokenize(t)), tasks=tasks)
        for d in docs:
            t0 = time.time()
            prep = suite.prepare(s, d["context"], need_replay="reconstruct" in need)
            if "reconstruct1" in need:
                first, later = (replay_prompt(s.model, s.fmt, p) for p in (FIRST_PROMPT, LATER_PROMPT))
                prep.evidence["reconstruct1"] = replay_scores(s.bridge, s.cache.tokens, first, later,
                                                              chunk_size=512, step=1)
            text, offs = char_offsets(s)
            vpos = [spans(text, offs, q)[0] for q in d["questions"]]
            for name, method, b in confs:
                if method.evidence_kind != "question":
                    suite.compress(s, prep, method, b)
                for qi, q in enumerate(d["questions"]):
                    if method.evidence_kind == "question":
                        s.reset_chat()
                        s.bridge.write(prep.state)
                        prep.evidence["question"] = question_evidence(s, prep.n_tokens, q)
                        if name.startswith("native_"):
                            native_evict(s, prep, method, b)
                        else:
                            suite.compress(s, prep, method, b)
                    dp = s.cache.doc_pos  # int32[L, H, m]
                    nll, tf = suite.answer_logprob(s, q, suite.SuiteConfig())
                    v = vpos[qi]
                    kept = float(np.mean([np.isin(v, x).mean() for x in dp.reshape(-1, dp.shape[-1])])) \
                        if len(v) else float("nan")
                    rows.append({"doc": d["id"], "task": d["task"], "shape": q.get("shape"), "q": qi,
                                 "depth": q.get("depth"), "conf": name, "nll": nll,
                                 "tf": tf, "whole": tf == 1.0, "kept": kept})
            print(d["id"], d.get("shape"), d.get("n_tokens"), "%.1fs" % (time.time() - t0), flush=True)
            json.dump(rows, open(out, "w"))
    report(rows)


def report(rows):
    full = {(r["doc"], r["q"]): r for r in rows if r["conf"] == "full@1"}
    by = collections.defaultdict(list)
    for r in rows:
        by[r["conf"]].append(r)
    rng = np.random.default_rng(0)
    print(f"{'config':26s} {'dNLL':>7s} {'95% CI':>15s} {'tf-acc':>7s} {'full':>6s} {'whole':>6s} {'fullW':>6s} "
          f"{'keptW':>6s} {'kept':>5s} n")
    for c, rs in by.items():
        d = np.array([r["nll"] - full[(r["doc"], r["q"])]["nll"] for r in rs])
        bs = rng.choice(d, (2000, len(d))).mean(1)
        fw = np.array([full[(r["doc"], r["q"])]["whole"] for r in rs])
        w = np.array([r["whole"] for r in rs])
        kept = np.nanmean([r["kept"] for r in rs]) if any(r["kept"] == r["kept"] for r in rs) else float("nan")
        print(f"{c:26s} {d.mean():7.3f} ({np.percentile(bs, 2.5):6.3f},{np.percentile(bs, 97.5):6.3f}) "
              f"{np.mean([r['tf'] for r in rs]):7.3f} {np.mean([full[(r['doc'], r['q'])]['tf'] for r in rs]):6.3f} "
              f"{w.mean():6.3f} {fw.mean():6.3f} {w[fw].mean() if fw.any() else float('nan'):6.3f} {kept:5.2f} {len(d)}")


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        report(json.load(open(sys.argv[2])))
    else:
        main()
