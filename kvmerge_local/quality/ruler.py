"""RULER-style long-document tasks with real answer shapes, several questions per document (generated locally).

A *document* record (JSONL; ``kvmerge-local bench --documents FILE`` reads one per line) is ``{"id", "task", "context", "questions": [{"question", "answer", "depth",
"shape"}], "n_tokens"}``: the context is compressed ONCE, then every question is asked on the same compressed
cache (the chat case).  ``answer`` is a list of strings: the score of a reply is the fraction of them it
contains (RULER's ``string_match_all``; 0/1 for one answer).

Haystack: prose paragraphs of Python's own reference documentation (``pydoc_data.topics``, shipped with every
CPython, so the same text on every machine of the project); the needles are sentences a model cannot have
memorized: random 7-digit numbers, random UUIDs, random words and names from the lists below.

Task types (after RULER, Hsieh et al. 2024; templates are RULER's wording):

- ``niah_single``: one needle, one question;
- ``niah_multikey``: four needles with different keys and the same answer shape (distractors), two asked;
- ``niah_multiquery``: four needles at depths in the four quarters of the document, each asked separately
  (questions about the beginning, the middle and the end of one compressed document);
- ``niah_multivalue``: one key with four values spread over the document, all asked at once;
- ``variable_tracking``: ``VAR X = 12345`` then chains ``VAR Y = X`` (plus a distractor chain); every
  variable of the chain is asked;
- ``common_words``: a list of words where five appear 20 times and the others 2-3 times; the five asked.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import numpy as np

TASKS = ("niah_single", "niah_multikey", "niah_multiquery", "niah_multivalue", "variable_tracking", "common_words")
SHAPES = ("number", "uuid", "word")
BENCH_SEED = 20_261_203
"""Seed of the default real-model suite (no model in this project was trained on it)."""

ADJECTIVES = """amber ancient bitter brave bright calm clever cold crimson curious dusty eager early fancy fierce
gentle giant golden green hidden hollow humble icy jolly kind lazy little lively lonely lucky mighty misty
narrow noble odd pale patient polite proud quiet rapid rare rough royal rustic scarlet shiny silent silver
sleepy slow smooth solid sour steady stormy strange sunny swift tall tender tiny vast velvet violet warm
wild wise wooden young""".split()
NOUNS = """anchor apple arrow badge basket beacon bell blanket bottle bridge bucket button cabin camera candle
canyon castle cellar chariot cherry cliff clock cloud comet compass crystal desert diamond dragon drum eagle
engine falcon feather fiddle forest fountain garden glacier harbor helmet island jacket kettle ladder
lantern lemon library lighthouse magnet marble meadow mirror monkey mountain needle ocean orchard otter
palace parrot pebble pepper piano pigeon planet pocket pumpkin rabbit river rocket saddle scarf shadow
shell spider squirrel statue storm sunset teapot temple thunder tiger tower trumpet tunnel turtle valley
violin volcano wagon walnut whale window wizard""".split()
NAMES = """Abigail Adrian Alice Amara Benedict Bianca Camille Cedric Dalia Dominic Eleanor Elias Fatima Felix
Gideon Greta Hamish Helena Ingrid Isaac Jasper Johanna Kamal Keira Leopold Lucia Magnus Marisol Nadia
Nikolai Octavia Oswald Priya Quentin Rosalind Rupert Sabine Silas Tamsin Tobias Ulrich Ursula Valentina
Victor Wilhelmina Winston Xavier Yasmin Yusuf Zara Zoltan""".split()
WORDS = """acorn album alley antler apron attic bamboo banjo barrel beetle biscuit blossom bonnet bracelet brick
broom cactus canal carpet carrot cereal chimney cobweb coconut cookie copper cotton cradle crayon cricket
cupboard curtain dagger daisy dolphin donkey doorbell dumpling easel elbow emerald fabric fence ferry fig
flannel flute fossil gadget garlic gazebo ginger goblet granite grapefruit gravel hammock harp hazelnut
hedgehog honey hoop iceberg igloo ink ivory jelly jigsaw kayak kiwi knapsack lagoon lasso lettuce lizard
lobster locket mango mitten mosaic muffin mushroom napkin nectar noodle oatmeal olive onion oyster paddle
panther parsley peanut pearl pelican pillow pinecone pistachio poodle quilt radish raisin raven ribbon
saffron sapphire satchel scooter seashell sequin shovel skillet sparrow spatula sponge sprout stapler
strawberry sunflower tambourine tangerine thimble toffee tortoise trombone tulip umbrella vanilla walrus
wardrobe whistle yarn yogurt zebra zeppelin""".split()

_SHAPE_NOUN = {"number": "number", "uuid": "uuid", "word": "word"}


# ------------------------------------------------------------------------------------------- haystack
def haystack_paragraphs() -> list[str]:
    """Prose paragraphs of ``pydoc_data.topics`` (code, lists and short lines dropped), in a fixed order."""
    import pydoc_data.topics as topics  # noqa: PLC0415

    out = []
    for key in sorted(topics.topics):
        for p in re.split(r"\n\s*\n", topics.topics[key]):
            lines = p.strip().splitlines()
            if not lines or any(ln.startswith((" ", "\t", ">>>", "*", "-", "+", "=")) for ln in lines):
                continue
            s = " ".join(ln.strip() for ln in lines)
            if len(s) >= 120 and s.count("(") <= 4 and s[0].isupper():
                out.append(s)
    return out


def _value(shape: str, rng: np.random.Generator) -> str:
    if shape == "number":
        return str(int(rng.integers(1_000_000, 10_000_000)))
    if shape == "uuid":
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    return str(rng.choice(WORDS))


def _keys(rng: np.random.Generator, n: int) -> list[str]:
    seen: dict[str, None] = {}  # insertion-ordered: a set's order follows PYTHONHASHSEED, not the seed
    while len(seen) < n:
        seen.setdefault(f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}")
    keys = list(seen)
    return [keys[i] for i in rng.permutation(len(keys))]


def _needle(key: str, value: str, shape: str) -> str:
    return f"One of the special magic {_SHAPE_NOUN[shape]}s for {key} is: {value}."


def _niah_question(key: str, shape: str) -> str:
    n = _SHAPE_NOUN[shape]
    return (f"What is the special magic {n} for {key} mentioned in the provided text? "
            f"The special magic {n} for {key} mentioned in the provided text is")


class Builder:
    """Fills a document of ``n_tokens`` (counted by ``count_tokens``) with haystack paragraphs and puts
    sentences at relative depths (0 = start, 1 = end) between paragraphs."""

    def __init__(self, paragraphs: list[str], count_tokens: Callable[[str], int]) -> None:
        self.paras, self.count = paragraphs, count_tokens
        self._len = [count_tokens(p) for p in paragraphs]

    def build(self, rng: np.random.Generator, n_tokens: int, inserts: list[tuple[float, str]], head: str) -> str:
        budget = n_tokens - self.count(head) - sum(self.count(s) for _, s in inserts) - 8
        order = rng.permutation(len(self.paras))
        body, used = [], 0
        for i in order:
            if used + self._len[i] > budget:
                continue
            body.append(self.paras[i])
            used += self._len[i]
            if used > budget - 40:
                break
        slots: dict[int, list[str]] = {}
        for depth, sent in inserts:
            slots.setdefault(int(round(float(np.clip(depth, 0, 1)) * len(body))), []).append(sent)
        parts = []
        for j in range(len(body) + 1):
            parts += slots.get(j, [])
            if j < len(body):
                parts.append(body[j])
        return head + "\n\n".join(parts) + "\n"


HEAD = ("Some special magic {what} are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about them afterwards.\n\n")


def _q(question: str, answer: list[str], depth: float, shape: str) -> dict:
    return {"question": question, "answer": answer, "depth": round(float(depth), 3), "shape": shape}


def make_document(task: str, rng: np.random.Generator, n_tokens: int, builder: Builder, shape: str) -> dict:
    """One document of ``task`` (see the module docstring) with ``shape`` answers; returns a record without id."""
    if task in ("niah_single", "niah_multikey", "niah_multiquery"):
        n = 1 if task == "niah_single" else 4
        keys = _keys(rng, n)
        vals = [_value(shape, rng) for _ in keys]
        depths = (rng.uniform(0, 1, n) if task != "niah_multiquery"
                  else np.array([rng.uniform(q / 4, (q + 1) / 4) for q in range(4)]))
        asked = range(n) if task != "niah_multikey" else sorted(rng.choice(n, 2, replace=False))
        inserts = [(d, _needle(k, v, shape)) for k, v, d in zip(keys, vals, depths)]
        qs = [_q(_niah_question(keys[i], shape), [vals[i]], depths[i], shape) for i in asked]
        ctx = builder.build(rng, n_tokens, inserts, HEAD.format(what=f"{_SHAPE_NOUN[shape]}s"))
    elif task == "niah_multivalue":
        key = _keys(rng, 1)[0]
        vals = list(dict.fromkeys(_value(shape, rng) for _ in range(4)))
        depths = rng.uniform(0, 1, len(vals))
        inserts = [(d, _needle(key, v, shape)) for v, d in zip(vals, depths)]
        n = _SHAPE_NOUN[shape]
        q = (f"What are all the special magic {n}s for {key} mentioned in the provided text? "
             f"The special magic {n}s for {key} mentioned in the provided text are")
        qs = [_q(q, vals, float(np.mean(depths)), shape)]
        ctx = builder.build(rng, n_tokens, inserts, HEAD.format(what=f"{n}s"))
    elif task == "variable_tracking":
        names = [f"{a.upper()}{rng.integers(10, 99)}" for a in rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ"), 10,
                                                                          replace=False)]
        value, other = (int(v) for v in rng.choice(np.arange(10000, 99999), 2, replace=False))
        chain, dist = names[:5], names[5:]
        depths = np.sort(rng.uniform(0, 1, 5))
        inserts = [(depths[0], f"VAR {chain[0]} = {value}")]
        inserts += [(depths[i], f"VAR {chain[i]} = {chain[i - 1]}") for i in range(1, 5)]
        dd = np.sort(rng.uniform(0, 1, 5))
        inserts += [(dd[0], f"VAR {dist[0]} = {other}")] + [(dd[i], f"VAR {dist[i]} = {dist[i - 1]}") for i in range(1, 5)]
        q = (f"Find all variables that are assigned the value {value} in the text above. "
             f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
             f"assigned the value {value}, they are:")
        qs = [_q(q, chain, float(np.mean(depths)), "name")]
        ctx = builder.build(rng, n_tokens, inserts, "Memorize and track the chain(s) of variable assignment "
                                                   "hidden in the following text.\n\n")
        shape = "name"
    elif task == "common_words":
        n_rest = int(np.clip((n_tokens // 4 - 100) / 2.5, 20, len(WORDS) - 5))
        words = [str(w) for w in rng.choice(WORDS, 5 + n_rest, replace=False)]
        top, rest = words[:5], words[5:]
        seq = top * 20 + [w for w in rest for _ in range(int(rng.integers(2, 4)))]
        rng.shuffle(seq)
        lst = " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq))
        ctx = ("Below is a numbered list of words. In these words, some appear more often than others. "
               "Memorize the ones that appear most often.\n" + lst + "\n")
        q = ("Question: What are the 5 most common words in the above list? "
             "Answer: The top 5 words that appear most often in the list are:")
        qs = [_q(q, top, 0.5, "word")]
        shape = "word"
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return {"task": task, "shape": shape, "context": ctx, "questions": qs}


def generate(n_per_task: int, lengths: list[int], seed: int, count_tokens: Callable[[str], int],
             tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """``n_per_task`` documents per task type, lengths and answer shapes cycled, seeded; each record gets
    ``id`` and ``n_tokens`` (the target length)."""
    builder = Builder(haystack_paragraphs(), count_tokens)
    out = []
    for ti, task in enumerate(tasks):
        rng = np.random.default_rng([seed, ti])
        for i in range(n_per_task):
            n_tok = int(lengths[i % len(lengths)])
            shape = SHAPES[(i // len(lengths)) % len(SHAPES)] if task.startswith("niah") else ""
            rec = make_document(task, rng, n_tok, builder, shape or "number")
            rec.update(id=f"{task}-{i}", n_tokens=n_tok)
            out.append(rec)
    return out


# ------------------------------------------------------------------------------------------- scoring
def score_all(output: str, answers: list[str]) -> float:
    """Fraction of ``answers`` that occur in ``output`` (case-insensitive; numbers and UUIDs as whole tokens)."""
    o = output.lower()
    hits = 0
    for a in answers:
        a = a.lower()
        if re.search(r"(?<![0-9a-z])" + re.escape(a) + r"(?![0-9a-z])", o):
            hits += 1
    return hits / len(answers) if answers else 0.0
