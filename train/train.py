"""Reproducible CPU training of the embedded default model (run: ``python -m train.train``).

Sequences come from :func:`train.data.training_text` (dense facts + questions over natural filler,
or plain filler) and are tokenized by llama.cpp itself, with the exported vocabulary (the first 4096 Llama-2
tokens), so training sees exactly the token ids the GGUF will see.  Loss: mean cross-entropy on the answer
continuations plus ``lm_weight`` times the mean cross-entropy on all other tokens.  A curriculum of stages
(sequence length, fact density, steps) goes from short dense sequences to long ones.  Every ``eval_every`` steps
the held-out task accuracy (all continuation tokens right under teacher forcing, a proxy for greedy decoding)
is logged and a checkpoint written under ``--out`` (default ``/tmp/kvmerge-train``); ``best.pt`` keeps the best.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .model import LlamaLM, default_config, init_circuit

logger = logging.getLogger(__name__)

TOKENIZER_GGUF = Path("/tmp/kvmerge-tokenizer-4096.gguf")

#: (seq_len, batch, density facts/100 tokens, plain-text fraction, steps)
DEFAULT_STAGES = ((256, 16, 2.0, 0.1, 300), (512, 8, 1.5, 0.1, 400), (1024, 4, 1.0, 0.1, 500),
                  (2048, 2, 0.6, 0.1, 500), (4096, 1, 0.4, 0.1, 300))


def tokenizer_model():
    """A :class:`~kvmerge_local.bridge.LlamaModel` whose tokenizer is the exported one (a 1-layer random
    model with the same vocabulary, written once to :data:`TOKENIZER_GGUF`)."""
    from kvmerge_local.bridge import LlamaModel  # noqa: PLC0415
    from kvmerge_local.tiny.model import make_tiny_llama  # noqa: PLC0415

    if not TOKENIZER_GGUF.exists():
        make_tiny_llama(TOKENIZER_GGUF, vocab="llama2-small", n_vocab=data.N_VOCAB, n_layer=1)
    return LlamaModel(TOKENIZER_GGUF)


class Batcher:
    """Deterministic batches: step ``s`` uses ``np.random.default_rng([seed, s])``."""

    def __init__(self, corpus: data.Corpus, tok_model, seed: int, mix: tuple[float, ...] = data.DEFAULT_MIX,
                 supervise_stop: bool = True, hop_verb: str = "contains") -> None:
        self.asm = data.Assembler(corpus, data.llama_token_counter(tok_model))
        self.tok = tok_model
        self.seed = seed
        self.mix = mix
        self.supervise_stop = supervise_stop
        self.hop_verb = hop_verb

    def batch(self, step: int, seq_len: int, batch: int, density: float, plain: float,
              split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """tokens int64 ``[B, seq_len]`` (padded by wrapping filler) and answer mask bool ``[B, seq_len]``."""
        rng = np.random.default_rng([self.seed, step])
        toks = np.zeros((batch, seq_len), np.int64)
        mask = np.zeros((batch, seq_len), bool)
        for b in range(batch):
            dens = 0.0 if rng.random() < plain else density * float(rng.uniform(0.3, 1.0))
            text, spans = data.training_text(self.asm, rng, seq_len - 16, dens, split, self.mix,
                                             self.supervise_stop, self.hop_verb)
            ids, ans = data.encode(self.tok, text, spans)
            if len(ids) >= seq_len:  # keep the end (the questions), drop the start of the filler
                ids = np.concatenate([ids[:1], ids[-(seq_len - 1):]])
                ans = np.concatenate([ans[:1], ans[-(seq_len - 1):]])
            n = len(ids)
            toks[b, :n], mask[b, :n] = ids, ans
            if n < seq_len:
                toks[b, n:] = 2  # </s> padding, never a target
        return torch.from_numpy(toks), torch.from_numpy(mask)


def losses(model: LlamaLM, toks: torch.Tensor, ans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer CE, LM CE on other non-pad tokens, answer-token accuracy) for one batch."""
    logits = model(toks[:, :-1])
    tgt = toks[:, 1:]
    m_ans = ans[:, 1:]
    m_lm = (~m_ans) & (tgt != 2)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
    la = (ce * m_ans).sum() / m_ans.sum().clamp(min=1)
    ll = (ce * m_lm).sum() / m_lm.sum().clamp(min=1)
    acc = ((logits.argmax(-1) == tgt) & m_ans).sum() / m_ans.sum().clamp(min=1)
    return la, ll, acc


@torch.no_grad()
def eval_tasks(model: LlamaLM, tok_model, records: list[dict]) -> dict[str, float]:
    """Per-task fraction of records whose whole continuation is predicted right under teacher forcing."""
    model.eval()
    res: dict[str, list[bool]] = {}
    for r in records:
        text = r["context"] + r["question"] + r["continuation"]
        a = len(r["context"]) + len(r["question"])
        ids, ans = data.encode(tok_model, text, [(a, a + len(r["continuation"]))])
        t = torch.from_numpy(ids)[None]
        pred = model(t[:, :-1]).argmax(-1)[0]
        ok = bool((pred == t[0, 1:])[torch.from_numpy(ans[1:])].all())
        res.setdefault(r["task"], []).append(ok)
    model.train()
    out = {k: float(np.mean(v)) for k, v in res.items()}
    out["mean"] = float(np.mean([x for v in res.values() for x in v]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/kvmerge-train")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lm-weight", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stages", default=json.dumps(DEFAULT_STAGES), help="JSON list of "
                    "[seq_len, batch, density, plain_fraction, steps]")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=40)
    ap.add_argument("--resume", default=None, help="checkpoint to start from (weights only)")
    ap.add_argument("--mix", default=json.dumps(data.DEFAULT_MIX), help="JSON shares of needle, qa, "
                    "variable-chain and multi-hop facts in training sequences")
    ap.add_argument("--step0", type=int, default=0, help="first step number (batch seeds continue from it)")
    ap.add_argument("--no-stop-span", action="store_true", help="do not supervise the newline after answers "
                    "(run 1 of the committed model was trained so)")
    ap.add_argument("--hop-verb", default="contains", help="relation word of the second multi-hop fact (run 1 "
                    "of the committed model used 'holds', two tokens)")
    ap.add_argument("--stop-at", type=int, default=0, help="end the run after this step (keeps the schedule)")
    ap.add_argument("--no-circuit", action="store_true", help="plain init (no hand-set retrieval circuit)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "train.log")])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    stages = [tuple(s) for s in json.loads(args.stages)]
    cfg = default_config()
    model = LlamaLM(cfg)
    circuit = None if args.no_circuit else init_circuit(model, seed=args.seed)
    if args.resume:
        model.load_state_dict(torch.load(args.resume)["model"])
    logger.info("model %s, %d params", cfg, model.n_params())
    corpus = data.load_corpus()
    tok = tokenizer_model()
    mix = tuple(json.loads(args.mix))
    batcher = Batcher(corpus, tok, args.seed, mix, supervise_stop=not args.no_stop_span, hop_verb=args.hop_verb)
    evals = {n: data.generate_tasks(args.eval_n, seed=args.seed + 7, min_tokens=n // 2, max_tokens=n,
                                    corpus=corpus, split="heldout", count_tokens=data.llama_token_counter(tok))
             for n in sorted({s[0] for s in stages})}
    total = sum(s[4] for s in stages)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    meta = dict(config=dataclasses.asdict(cfg), seed=args.seed, lr=args.lr, lm_weight=args.lm_weight, stages=stages,
                circuit=circuit, n_params=model.n_params(), mix=mix, step0=args.step0, resume=args.resume,
                supervise_stop=not args.no_stop_span, hop_verb=args.hop_verb)
    if args.resume:
        meta["resumed_from"] = torch.load(args.resume)["meta"]
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    step, seen, t0, best = 0, 0, time.time(), -1.0
    hist: list[dict] = []
    for seq_len, batch, density, plain, n_steps in stages:
        if args.stop_at and step >= args.stop_at:
            break
        for _ in range(n_steps if not args.stop_at else min(n_steps, args.stop_at - step)):
            lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
            for gr in opt.param_groups:
                gr["lr"] = lr
            toks, ans = batcher.batch(args.step0 + step, seq_len, batch, density, plain)
            la, ll, acc = losses(model, toks, ans)
            loss = la + args.lm_weight * ll
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            seen += toks.numel()
            if step % 10 == 0:
                el = time.time() - t0
                logger.info("step %d len %d ans_loss %.3f lm_loss %.3f ans_acc %.3f lr %.2e tokens %d %.0f tok/s",
                            step, seq_len, la.item(), ll.item(), acc.item(), lr, seen, seen / el)
            if step % args.eval_every == 0 or step in (total, args.stop_at):
                ev = eval_tasks(model, tok, evals[seq_len])
                rec = dict(step=step, seq_len=seq_len, tokens=seen, seconds=round(time.time() - t0), eval=ev,
                           ans_loss=la.item(), lm_loss=ll.item())
                hist.append(rec)
                logger.info("EVAL %s", json.dumps(rec))
                ck = dict(model=model.state_dict(), config=dataclasses.asdict(cfg), step=step, tokens=seen, eval=ev,
                          seq_len=seq_len, meta=meta)
                torch.save(ck, out / "last.pt")
                score = ev["mean"] * (seq_len / 4096)  # prefer the longest-context stage reached
                if score >= best:
                    best = score
                    torch.save(ck, out / "best.pt")
                (out / "history.json").write_text(json.dumps(hist, indent=1))
    logger.info("done: %d steps, %d tokens, %.0f s", step, seen, time.time() - t0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
