"""KVzip variants measured for issue 12 (README, "Results on the real model"): per-head (the method), the same
cells for every head of a layer or every layer (rank-averaged scores), more recent tokens, more sinks, pooling.

    python scripts/experiments/kvzip_variants.py METHODS TASKS N_PER_TASK LENGTHS OUT.json [BUDGETS]
    python scripts/experiments/kvzip_variants.py kvzip,streaming,kz_layer_rank niah_single,niah_multikey,niah_multiquery 6 1024 v6.json

Prints accuracy, the fraction of the full cache's right answers kept, and retention per (variant, budget).
Exploration code: the documents of the README's figures were generated before the generator's hash-seed fix.
"""
import os, sys, time, json, dataclasses, collections
os.environ.setdefault("OMP_WAIT_POLICY","PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import numpy as np
from kvmerge_local.quality import ruler, suite
from kvmerge_local.quality.harness import make_method
from kvmerge_local.methods import KVzip, StreamingLLM
from kvmerge_local.methods.base import Selection
from kvmerge_local.engine import Session
from kvmerge_local.models import default_document_model

def rank01(x):  # per-(l,h) rank normalisation along N
    r=np.argsort(np.argsort(x,axis=-1),axis=-1).astype(np.float32)
    return r/max(1,x.shape[-1]-1)

@dataclasses.dataclass
class KZ(Selection):
    n_sink: int = 4
    n_recent: int = 1
    recent_frac: float = 0.0
    agg: str = "head"      # head | layer | token
    norm: str = "rank"     # rank | max | raw
    pool: int = 0
    evidence_kind = "reconstruct"
    name="kz"
    def recent(self, m): return max(self.n_recent, int(self.recent_frac*m))
    def scores(self, keys, positions, ev, m):
        s=ev.astype(np.float32)
        if self.pool:
            from numpy.lib.stride_tricks import sliding_window_view as swv
            p=np.pad(s,((0,0),(0,0),(self.pool,self.pool)),mode="edge")
            s=swv(p,2*self.pool+1,axis=-1).max(-1)
        if self.agg=="head": return np.ascontiguousarray(s)
        if self.norm=="rank": s=rank01(s)
        elif self.norm=="max": s=s/np.maximum(s.max(-1,keepdims=True),1e-9)
        if self.agg=="layer": s=s.mean(1,keepdims=True)
        elif self.agg=="layer_hmax": s=s.max(1,keepdims=True)
        else: s=np.broadcast_to(s.mean((0,1))[None,None],(s.shape[0],1,s.shape[2]))
        return np.ascontiguousarray(s,dtype=np.float32)

V={"kvzip":KVzip(), "streaming":StreamingLLM(),
   "kz_tok_rank":KZ(agg="token",norm="rank"), "kz_tok_max":KZ(agg="token",norm="max"),
   "kz_layer_rank":KZ(agg="layer",norm="rank"),
   "kz_rec50":KZ(recent_frac=0.5), "kz_tok_rec50":KZ(agg="token",norm="max",recent_frac=0.5),
   "kz_rec25":KZ(recent_frac=0.25), "kz_layer_max":KZ(agg="layer",norm="max"), "kz_layer_raw":KZ(agg="layer",norm="raw"),
   "kz_layer_hmax":KZ(agg="layer_hmax",norm="rank"), "kz_layer_pool1":KZ(agg="layer",norm="rank",pool=1),"kz_sink64":KZ(n_sink=64)}
sel=sys.argv[1].split(","); tasks=tuple(sys.argv[2].split(",")); n=int(sys.argv[3]); lens=[int(x) for x in sys.argv[4].split(",")]; out=sys.argv[5]
budgets=[float(x) for x in (sys.argv[6] if len(sys.argv)>6 else "0.5,0.25").split(",")]
rows=[]
with Session.open(str(default_document_model()), n_ctx=max(lens)+512, chat_format=None, n_threads=2) as s:
    confs=[("full", make_method("full"), 1.0)]+[(k, V[k] if k in V else make_method(k), b) for k in sel for b in budgets]
    cnt=lambda t: len(s.model.tokenize(t))
    docs=ruler.generate(n,lens,11,cnt,tasks=tasks)
    for d in docs:
        t0=time.time()
        rows+=suite.run_document(s, d, confs, suite.SuiteConfig(prompt="chat"))
        print(d["id"], d.get("shape"), "%.1fs"%(time.time()-t0), flush=True)
        json.dump(rows, open(out,"w"))
full={ (x["doc"],x["q"]):x["score"] for x in rows if x["method"]=="full"}
agg=collections.defaultdict(list)
for x in rows: agg[(x["method"],x["budget"])].append((x["score"], full[(x["doc"],x["q"])]))
for k,v in sorted(agg.items(), key=lambda kv:(-kv[0][1], kv[0][0])):
    v=np.array(v); fm=v[:,1]>0
    print("%-16s %.2f acc %.3f  kept-of-full %.3f  retention %.2f (n=%d, full-right=%d)"%(k[0],k[1], v[:,0].mean(), v[fm,0].mean() if fm.any() else float('nan'), v[:,0].mean()/max(1e-9,v[:,1].mean()), len(v), fm.sum()))
