#!/usr/bin/env bash
# Behaviour check across a refactor: the same suite documents and the bridge benchmark on an OLD commit and on the
# working tree, in one run (issue 10's "same figures before and after").
#
#   scripts/experiments/compare_commits.sh OLD_COMMIT [OUT_DIR]
#
# The old commit is checked out as a detached worktree; both sides run with this checkout's .venv. Quality rows
# must be identical (greedy decoding, deterministic documents); speed ratios are printed side by side.
set -euo pipefail
OLD=${1:?usage: compare_commits.sh OLD_COMMIT [OUT_DIR]}
OUT=${2:-/tmp/kvmerge-compare}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=$ROOT/.venv/bin/python
export OMP_WAIT_POLICY=PASSIVE
mkdir -p "$OUT"
WT=$OUT/old-tree
[ -d "$WT" ] || git -C "$ROOT" worktree add -q --detach "$WT" "$OLD"
cd "$ROOT"
$PY - "$OUT/docs.jsonl" <<'PY'
import json, sys
from kvmerge_local.quality import ruler
from kvmerge_local.engine import Session
from kvmerge_local.models import default_document_model
with Session.open(str(default_document_model()), n_ctx=2048, n_threads=2) as s:
    docs = ruler.generate(1, [1024], ruler.BENCH_SEED, lambda t: len(s.model.tokenize(t)))
with open(sys.argv[1], "w") as f:
    for d in docs:
        f.write(json.dumps(d) + "\n")
PY
ARGS="--documents $OUT/docs.jsonl --n-ctx 1536 --methods full,kvzip,streaming_llm,kvmerger+budget,snapkv,cam+kvzip --budgets 0.5 --threads 2 --quiet"
(cd "$WT" && PYTHONPATH=$WT $PY -m kvmerge_local.cli bench $ARGS --out "$OUT/old" > "$OUT/old.log" 2>&1)
(cd "$ROOT" && $PY -m kvmerge_local.cli bench $ARGS --out "$OUT/new" > "$OUT/new.log" 2>&1)
$PY - "$OUT" <<'PY'
import json, sys
o, n = (json.load(open(f"{sys.argv[1]}/{w}/results.json"))["rows"] for w in ("old", "new"))
key = lambda r: (r["doc"], r["q"], r["method"], r["budget"])
O, N = ({key(r): (r["output"], r["cells"]) for r in rows} for rows in (o, n))
same = sum(O[k] == N.get(k) for k in O)
print(f"quality: {same} of {len(O)} question x configuration outputs identical")
PY
BB=$(ls "$WT"/bench/bench_bridge.py "$WT"/benchmarks/speed/bench_bridge.py 2>/dev/null | head -1)
echo "speed, old:"; (cd "$WT" && PYTHONPATH=$WT $PY "$BB")
echo "speed, new:"; PYTHONPATH=$ROOT $PY "$ROOT/benchmarks/speed/bench_bridge.py"
