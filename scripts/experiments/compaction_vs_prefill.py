"""Compaction time / prefill time on the real model (issue 11): one 2K-token document, 50%, in place and on the
state path.  ``python scripts/experiments/compaction_vs_prefill.py`` (needs `make setup`)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from kvmerge_local.engine import Session  # noqa: E402
from kvmerge_local.models import default_document_model  # noqa: E402
from kvmerge_local.quality import ruler  # noqa: E402

for inplace in (None, False):
    for method in ("streaming_llm", "kvmerger+budget"):
        with Session.open(default_document_model(), n_ctx=2600, n_threads=2, method=method, budget=0.5) as s:
            s.bridge.inplace = inplace
            doc = ruler.generate(1, [2048], 3, lambda t: len(s.model.tokenize(t)), tasks=("niah_single",))[0]
            st = s.ingest(doc["context"])
            print(f"{'in place' if inplace is None else 'state path'} {method}: {st.tokens_ingested} tokens, "
                  f"prefill {st.t_prefill:.2f}s, compact {st.t_compact:.3f}s, ratio {st.t_compact / st.t_prefill:.4f}")
