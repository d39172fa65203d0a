"""The quality benchmark's task generator: synthetic long-context tasks (deterministic, seeded; NumPy only).

Natural text comes from files on this machine (:func:`load_corpus`: Python stdlib sources, ``/usr/share/doc``,
man pages with troff stripped), split by a hash of the file path into a training and a held-out part.  Tasks
put facts into that filler and ask about them AFTER the context; every answer is one word that is a single
token of the Llama-2 vocabulary prefix the model uses, preceded by a cue that ends ``... KEY is`` / ``VAR KEY =``
(RULER-style answer prefixes), so the tokenizer splits answers predictably:

- ``niah_single``: one needle ``The special magic word for KEY is VALUE.`` in filler.
- ``niah_multikey``: many such needles (distractors with other keys); one is asked.
- ``variable_tracking``: ``VAR a = VALUE.`` then ``VAR b = a.`` ... (chains of 2-4) plus distractor chains; the
  answer prefix ``VAR d =`` makes the model walk the chain aloud (``c. VAR c = b. ... VAR a = VALUE.``).
- ``multi_hop``: ``The box of KEY is BOX.`` and ``The box BOX contains VALUE.``; answered in two steps aloud.
- ``qa_filler``: facts with varied relations (``The hometown of KEY is VALUE.``) inside natural paragraphs.

Task records (the benchmark's JSONL format): ``{"id", "task", "context", "question", "answer"}``; the prompt is
``context + question`` tokenized as ONE text; ``answer`` is the final value word.  ``scripts/make_tasks.py``
writes the default task files with :func:`generate_tasks`; the trainer of the embedded model (``train/data.py``)
builds its dense training sequences from the same corpus, facts and :class:`Assembler`.  Task files are read back
with :func:`kvmerge_local.quality.harness.read_jsonl` / :func:`~kvmerge_local.quality.harness.load_tasks`.
"""
from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TASKS = ("niah_single", "niah_multikey", "variable_tracking", "multi_hop", "qa_filler")
N_VOCAB = 4096
"""The model's vocabulary: the first 4096 tokens of the Llama-2 SentencePiece vocabulary."""

RELATIONS = ("hometown", "favorite color", "pet", "secret word", "job", "lucky charm", "password", "nickname",
             "best friend", "car")
_STOP = set("""that this with from have which would there your they what when will their been more some other
into than then them these only also such were about over after where most make like just here very must
each those many does said return self import class print string value name type file data none true false
list dict path line text time case else elif from pass with while yield lambda global test info user code
default error output input number option options command file files system table page help note""".split())
_SPACE = "\u2581"


def _vocab_tokens() -> list[str]:
    from kvmerge_local.tiny.model import _read_vocab  # noqa: PLC0415  (gguf reader, read once)

    return list(_read_vocab("llama2-small", N_VOCAB)["tokens"])


def word_pools(n_vocab: int = N_VOCAB) -> tuple[list[str], list[str]]:
    """(keys, values): disjoint lists of lowercase words that are ONE token (``▁word``) of the vocabulary
    prefix, taken from its rarer half (ids >= 1000: less likely to occur in the filler), 4-10 letters, no
    common/code words.  Deterministic (depends only on the vocabulary)."""
    toks = _vocab_tokens()[:n_vocab]
    words = [t[1:] for i, t in enumerate(toks) if i >= 1000 and re.fullmatch(_SPACE + "[a-z]{4,10}", t)
             and t[1:] not in _STOP]
    keys = [w for w in words if zlib.crc32(w.encode()) % 2 == 0]
    values = [w for w in words if zlib.crc32(w.encode()) % 2 == 1]
    return keys, values


# ---------------------------------------------------------------------------------------------- corpus
_TROFF_KEEP = {"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB"}


def _strip_troff(src: str) -> str:
    """Man-page troff -> plain paragraphs (font macros kept as text, other requests dropped)."""
    out: list[str] = []
    for line in src.splitlines():
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if parts and parts[0] in _TROFF_KEEP and len(parts) > 1:
                line = parts[1].replace('"', "")
            elif parts and parts[0] in ("PP", "P", "LP", "SH", "SS", "TP", "IP", "sp", "br"):
                out.append("")
                if parts[0] in ("SH", "SS") and len(parts) > 1:
                    out += [parts[1].replace('"', "").title(), ""]
                continue
            else:
                continue
        line = re.sub(r"\\f[BIRPC0-9]|\\f\(..|\\&|\\\(..|\\[*]\(?..?|\\s[-+]?\d", "", line)
        out.append(line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " "))
    return "\n".join(out)


def _read_text(path: Path) -> str:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    text = raw[:200_000].decode("utf-8", "replace")
    return _strip_troff(text) if "/man/" in str(path) else text


def _paragraphs(text: str) -> list[str]:
    paras = []
    for p in re.split(r"\n\s*\n", text):
        p = p.strip("\n")
        if 80 <= len(p) <= 2000 and p.isascii() and "\x00" not in p and "\ufffd" not in p:
            paras.append(p)
    return paras


@dataclass
class Corpus:
    """Paragraph lists of the machine's text; ``split`` = "train" or "heldout" by file-path hash (1 in 10)."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)

    def paras(self, split: str) -> list[str]:
        return self.heldout if split == "heldout" else self.train


def load_corpus(max_chars_per_source: int = 6_000_000) -> Corpus:
    """Read Python sources (``/usr/lib/python3*``), ``/usr/share/doc`` text and man pages (section 1, 5, 8) in
    sorted path order (deterministic on one machine), up to ``max_chars_per_source`` characters each."""
    roots = {
        "python": sorted(Path("/usr/lib").glob("python3*/**/*.py")),
        "doc": sorted(p for p in Path("/usr/share/doc").rglob("*") if p.is_file()
                      and not p.name.startswith("changelog") and p.suffix in ("", ".gz", ".txt", ".md", ".rst")),
        "man": sorted(p for s in ("man1", "man5", "man8") for p in Path(f"/usr/share/man/{s}").glob("*.gz")),
    }
    corpus = Corpus()
    for name, paths in roots.items():
        n = 0
        for p in paths:
            if n >= max_chars_per_source:
                break
            try:
                paras = _paragraphs(_read_text(p))
            except (OSError, EOFError, zlib.error, ValueError):
                continue
            dest = corpus.heldout if zlib.crc32(str(p).encode()) % 10 == 0 else corpus.train
            dest += paras
            n += sum(len(x) for x in paras)
        corpus.sources[name] = n
    logger.info("corpus: %s chars per source, %d train / %d held-out paragraphs", corpus.sources,
                len(corpus.train), len(corpus.heldout))
    return corpus


# ---------------------------------------------------------------------------------------------- facts
@dataclass
class QA:
    """One question: ``question`` (starts with a blank line, ends with the answer cue), ``continuation`` (what
    a correct model writes next, starting with a space, ending with '.'), ``answer`` (the final word)."""

    task: str
    question: str
    continuation: str
    answer: str


@dataclass
class Facts:
    """Sentences to place in the filler: ``ordered`` keep their relative order, ``inline`` go inside
    paragraphs, ``lines`` between paragraphs; ``qas`` ask about them."""

    lines: list[str] = field(default_factory=list)
    inline: list[str] = field(default_factory=list)
    qas: list[QA] = field(default_factory=list)


def _q(body: str, cue: str) -> str:
    return f"\n\nQuestion: {body}\nAnswer: {cue}"


def _niah(rng, keys, vals, f: Facts, n: int, n_ask: int, task: str) -> None:
    for i in range(n):
        k, v = keys.pop(), vals.pop()
        f.lines.append(f"The special magic word for {k} is {v}.")
        if i < n_ask:
            f.qas.append(QA(task, _q(f"What is the special magic word for {k}?", f"The special magic word for {k} is"),
                            f" {v}.", v))


def _qa(rng, keys, vals, f: Facts, n: int, n_ask: int) -> None:
    for i in range(n):
        k, v, rel = keys.pop(), vals.pop(), RELATIONS[rng.integers(len(RELATIONS))]
        f.inline.append(f"The {rel} of {k} is {v}.")
        if i < n_ask:
            f.qas.append(QA("qa_filler", _q(f"What is the {rel} of {k}?", f"The {rel} of {k} is"), f" {v}.", v))


def _chain(rng, keys, vals, f: Facts, n_chains: int, n_ask: int) -> None:
    """Variable tracking: each chain ``VAR x0 = VALUE. VAR x1 = x0. ...`` (2-4 variables), statements of all
    chains interleaved in order. A question asks the last variable of a chain."""
    chains = []
    for _ in range(n_chains):
        names = [keys.pop() for _ in range(int(rng.integers(2, 5)))]
        chains.append((names, vals.pop()))
    stmts: list[list[str]] = [[f"VAR {names[0]} = {v}."] + [f"VAR {names[j]} = {names[j - 1]}."
                                                           for j in range(1, len(names))] for names, v in chains]
    order = [ci for ci, s in enumerate(stmts) for _ in s]
    rng.shuffle(order)
    pos = [0] * len(stmts)
    for ci in order:
        f.lines.append(stmts[ci][pos[ci]])
        pos[ci] += 1
    for names, v in chains[:n_ask]:
        walk = "".join(f" VAR {names[j]} = {names[j - 1]}." for j in range(len(names) - 1, 0, -1))
        cont = walk[len(f" VAR {names[-1]} ="):] + f" VAR {names[0]} = {v}."
        f.qas.append(QA("variable_tracking", _q(f"What is the value of VAR {names[-1]}?", f"VAR {names[-1]} ="),
                        cont, v))


def _hop(rng, keys, vals, f: Facts, n: int, n_ask: int, verb: str = "contains") -> None:
    """``verb`` should be one token (``holds`` is two here: ``▁h olds``, which moves the key one further back)."""
    for i in range(n):
        k, b, v = keys.pop(), keys.pop(), vals.pop()
        f.inline += [f"The box of {k} is {b}.", f"The box {b} {verb} {v}."]
        if i < n_ask:
            f.qas.append(QA("multi_hop", _q(f"What does the box of {k} hold?", f"The box of {k} is"),
                            f" {b}. The box {b} {verb} {v}.", v))


def _shuffled(rng: np.random.Generator, pools: tuple[list[str], list[str]]) -> tuple[list[str], list[str]]:
    """Fresh shuffled copies of the key and value pools (plain ``str``; facts pop from the end)."""
    return [str(w) for w in rng.permutation(pools[0])], [str(w) for w in rng.permutation(pools[1])]


def task_facts(task: str, rng: np.random.Generator, n_tokens: int, pools: tuple[list[str], list[str]]) -> Facts:
    """The facts and the single question of one benchmark task of ``task`` for a ~``n_tokens`` context."""
    keys, vals = _shuffled(rng, pools)
    f = Facts()
    scale = max(1, n_tokens // 256)
    if task == "niah_single":
        _niah(rng, keys, vals, f, 1, 1, task)
    elif task == "niah_multikey":
        _niah(rng, keys, vals, f, int(rng.integers(2 + scale, 3 + 2 * scale)), 1, task)
    elif task == "variable_tracking":
        _chain(rng, keys, vals, f, int(rng.integers(2, 2 + max(1, scale // 2))), 1)
    elif task == "multi_hop":
        _hop(rng, keys, vals, f, int(rng.integers(2, 3 + scale // 2)), 1)
    elif task == "qa_filler":
        _qa(rng, keys, vals, f, int(rng.integers(2 + scale, 3 + 2 * scale)), 1)
    else:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    return f


DEFAULT_MIX = (0.3, 0.25, 0.2, 0.25)
"""Shares of needle, qa, variable-chain and multi-hop facts in :func:`dense_facts`."""


def dense_facts(rng: np.random.Generator, n_tokens: int, pools: tuple[list[str], list[str]],
                density: float, mix: tuple[float, ...] = DEFAULT_MIX, hop_verb: str = "contains") -> Facts:
    """Training facts of every task type at once (``density`` ~ facts per 100 tokens, split by ``mix``), all
    asked in random order: multi-query associative-recall style supervision on long natural-filler contexts."""
    keys, vals = _shuffled(rng, pools)
    f = Facts()
    n = max(1, int(round(n_tokens * density / 100)))
    counts = rng.multinomial(n, np.asarray(mix, float) / sum(mix))
    _niah(rng, keys, vals, f, int(counts[0]), int(counts[0]), "niah_multikey")
    _qa(rng, keys, vals, f, int(counts[1]), int(counts[1]))
    _chain(rng, keys, vals, f, max(1, int(counts[2]) // 3), 8)
    _hop(rng, keys, vals, f, max(1, int(counts[3]) // 2), 8, hop_verb)
    rng.shuffle(f.qas)
    return f


# ---------------------------------------------------------------------------------------------- assembly
def approx_tokens(text: str) -> int:
    """Rough token count (about 2.8 characters per token for this vocabulary on the machine's text)."""
    return int(len(text) / 2.8) + 1


class Assembler:
    """Builds contexts of a target token length from corpus paragraphs plus facts.

    ``count_tokens(text) -> int`` (e.g. :func:`llama_token_counter`) measures pieces; counts of paragraphs are
    cached. The context is paragraphs joined by blank lines; ``lines`` facts are own paragraphs, ``inline``
    facts go after a sentence end inside a paragraph (or at its end)."""

    def __init__(self, corpus: Corpus, count_tokens: Callable[[str], int] = approx_tokens) -> None:
        self.corpus = corpus
        self.count = count_tokens
        self._cache: dict[tuple[str, int], int] = {}

    def _n(self, split: str, i: int, text: str) -> int:
        key = (split, i)
        if key not in self._cache:
            self._cache[key] = self.count(text) + 1
        return self._cache[key]

    def context(self, rng: np.random.Generator, n_tokens: int, facts: Facts, split: str) -> str:
        paras = self.corpus.paras(split)
        budget = n_tokens - sum(self.count(s) + 1 for s in facts.lines + facts.inline)
        start = int(rng.integers(len(paras)))
        chosen: list[str] = []
        i = start
        while (budget > 0 or not chosen) and len(chosen) < len(paras):
            p = paras[i % len(paras)]
            n = self._n(split, i % len(paras), p)
            if n > budget + 40 and chosen:
                if n > 2 * budget + 80:  # skip an overlong paragraph, keep looking for one that fits
                    i += 1
                    continue
                p = p[: max(40, int(len(p) * max(budget, 0) / n))].rsplit(" ", 1)[0]
            chosen.append(p)
            budget -= n
            i += 1
        for s in facts.inline:
            j = int(rng.integers(len(chosen)))
            p = chosen[j]
            cuts = [m.end() for m in re.finditer(r"[.!?] ", p)]
            at = cuts[int(rng.integers(len(cuts)))] if cuts else len(p)
            chosen[j] = (p[:at] + s + " " + p[at:]) if cuts else (p + " " + s)
        slots = np.sort(rng.integers(0, len(chosen) + 1, len(facts.lines)))
        out: list[str] = []
        k = 0
        for j in range(len(chosen) + 1):
            while k < len(slots) and slots[k] == j:
                out.append(facts.lines[k])
                k += 1
            if j < len(chosen):
                out.append(chosen[j])
        return "\n\n".join(out)


def generate_tasks(n: int, seed: int, min_tokens: int = 1024, max_tokens: int = 4096, *,
                   tasks: Iterable[str] = TASKS, corpus: Corpus | None = None, split: str = "heldout",
                   count_tokens: Callable[[str], int] = approx_tokens) -> list[dict]:
    """``n`` task records (cycling through ``tasks``), context lengths uniform in ``[min_tokens, max_tokens]``
    (as measured by ``count_tokens``; pass :func:`llama_token_counter` for exact llama.cpp counts), filler from
    the ``split`` part of the corpus.  Deterministic for a given seed, corpus and counter.  Each record:
    ``{"id", "task", "context", "question", "answer", "n_tokens", "continuation"}`` (the last two are extras
    the benchmark may ignore)."""
    corpus = corpus or load_corpus()
    asm = Assembler(corpus, count_tokens)
    pools = word_pools_cached()
    rng = np.random.default_rng(seed)
    tasks = tuple(tasks)
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        n_tok = int(rng.integers(min_tokens, max_tokens + 1))
        f = task_facts(task, rng, n_tok, pools)
        qa = f.qas[0]
        ctx = asm.context(rng, n_tok - count_tokens(qa.question), f, split)
        out.append({"id": f"{task}-{seed}-{i}", "task": task, "context": ctx, "question": qa.question,
                    "answer": qa.answer, "n_tokens": n_tok, "continuation": qa.continuation})
    return out


_POOLS: tuple[list[str], list[str]] | None = None


def word_pools_cached() -> tuple[list[str], list[str]]:
    global _POOLS
    if _POOLS is None:
        _POOLS = word_pools()
    return _POOLS


def llama_token_counter(model) -> Callable[[str], int]:
    """``count_tokens`` for :class:`~kvmerge_local.bridge.LlamaModel` ``model`` (no BOS)."""
    return lambda text: len(model.tokenize(text, add_bos=False))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records one JSON object per line (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
