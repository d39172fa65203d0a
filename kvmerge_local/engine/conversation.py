"""Questions and answers on top of the document cache: :class:`Chat`, owned by a :class:`~.session.Session`
(``session.chat``), which delegates ``ask``, ``peek_logits`` and ``reset_chat`` to it.

A turn is the question's tokens and the answer's decoded tokens, appended after the document cells at
consecutive positions; :attr:`Chat.turns` keeps their position ranges ``(p0, p1)``.  The last sampled token of
an answer (the end-of-generation token, or the one at the token limit) is not decoded at once: it is
:attr:`Chat.pending` and goes in front of the next turn's tokens.

Room: before a question, the turn needs ``len(question tokens) + max_new_tokens`` free cells.  Old turns
are dropped to make room -- the oldest after the first one, the first one (which continues the document)
last, so the template stays well formed; gaps are closed with llama.cpp's own ``seq_add`` (turn cells
have the same layout in every head).  A question that does not fit even then is refused.

Template formats (``gguf``, :mod:`.templates`): the question's tokens are the real conversation rendered by
the template (earlier questions and answers, the new question) minus the text already cached, tokenized
across the seam with special tokens parsed; an end-of-turn token left pending is dropped, as the rendered
text closes the answer itself.  :attr:`Chat.shown` keeps each turn's ``(question, answer as shown, answer as
decoded, cached text)``.  When a rendering does not continue the cached text (a template that rewrites
history, a raw turn, a dropped turn), that is logged and the turn is laid out from the template's placeholder
rendering instead.

Failure: a generator that raises midway removes every cell it added and restores the turn list, so the
session stays as it was; a generator closed early (the consumer stopped reading) keeps the partial answer.
"""
from __future__ import annotations

import codecs
import logging
import numbers
import time

import numpy as np

from ..errors import KVMergeError
from .cache import TAIL_CHARS
from .chat import StopFilter, continue_tokens
from .templates import DOC, Q1, Q2, TemplateFormat

log = logging.getLogger(__name__)


class Chat:
    """Chat turns after one document cache (see the module docstring).

    ``model``/``ctx``/``bridge``: the session's llama.cpp model, context and KV bridge; ``fmt``: its chat
    format (:func:`~.chat.detect_format`); ``cache``: the :class:`~.cache.DocumentCache` the turns follow (its
    ``tail``, ``last_id`` and ``n_cells``); ``rng``: the session's seeded generator (sampling).  A new
    document (ingest, restore) gets a new ``Chat``.  ``t_decode`` (seconds) and ``tokens_generated`` count
    the answers since then (:meth:`reset` keeps them)."""

    def __init__(self, model, ctx, bridge, fmt, cache, rng: np.random.Generator) -> None:
        self.model, self.ctx, self.bridge, self.fmt, self.cache, self._rng = model, ctx, bridge, fmt, cache, rng
        self._turns: list[tuple[int, int]] = []
        self._pending: list[int] = []
        self._chat_tail = ""
        self._chat_last: int | None = None
        self._tpl_turns: list[tuple[str | None, str, str, str]] = []  # (question, answer, raw answer, text)
        self._active = None
        self.t_decode, self.tokens_generated = 0.0, 0

    # --- read-only views -------------------------------------------------------------------------------
    @property
    def turns(self) -> list[tuple[int, int]]:
        """``(p0, p1)`` position range of each turn in the cache, oldest first (a copy)."""
        return list(self._turns)

    @property
    def pending(self) -> list[int]:
        """Token ids (0 or 1) sampled at the end of the last answer and not decoded yet (a copy)."""
        return list(self._pending)

    @property
    def shown(self) -> list[tuple[str | None, str, str, str]]:
        """Per turn (template formats): ``(question or None for a raw turn, answer as shown, answer as
        decoded, cached text)``; shorter than :attr:`turns` after a dropped or untracked turn (a copy)."""
        return list(self._tpl_turns)

    def is_end(self, tok: int) -> bool:
        """Whether ``tok`` ends an answer (an end-of-generation token, or the template's end of turn)."""
        return self.model.is_eog(tok) or int(tok) in getattr(self.fmt, "end_ids", ())

    # --- tokens ----------------------------------------------------------------------------------------
    def question_tokens(self, q: str, raw: bool = False) -> np.ndarray:
        """int32[n]: what goes into the cache before the answer (pending token, separators, question).

        ``raw``: ``q`` is text that continues the cache exactly as given (no template; seam rule applies)."""
        return self.question(q, raw)[0]

    def question(self, q: str, raw: bool = False, prefix: str = "") -> tuple[np.ndarray, str]:
        """The question's tokens (int32[n], see :meth:`question_tokens`) and the text they stand for;
        ``prefix`` (an answer cue such as "The number is") is laid after the turn's generation prompt."""
        fmt, m = self.fmt, self.model
        if raw or isinstance(fmt, TemplateFormat):
            text = (q if raw else self._template_text(q)) + prefix
            sp = not raw and fmt.special
            pre = [t for t in self._pending if not self.is_end(t)] if self._turns else []
            tail, last = (self._chat_tail, self._chat_last) if self._turns else (self.cache.tail, self.cache.last_id)
            if tail or self.cache.n_cells:
                body = continue_tokens(m, tail, last, text, special=sp)
            else:
                body = m.tokenize(text, add_bos=fmt.add_bos if sp else True, special=sp)
            return np.concatenate([np.asarray(pre, np.int32), body]).astype(np.int32), text
        if not self._turns:
            if self.cache.n_cells:
                text = fmt.first.format(q=q) + prefix
                return continue_tokens(m, self.cache.tail, self.cache.last_id, text), text
            text = fmt.solo.format(q=q) + prefix
            return m.tokenize(text, add_bos=True), text
        pre = [t for t in self._pending if not (fmt.turn_seam and self.is_end(t))]
        eos, bos = int(m.info["eos"]), int(m.info["bos"])
        for s in fmt.turn_special:
            t = eos if s == "eos" else bos
            if not (s == "eos" and pre and m.is_eog(pre[-1])):
                pre.append(t)
        text = fmt.turn.format(q=q) + prefix
        body = continue_tokens(m, self._chat_tail, self._chat_last, text) if fmt.turn_seam else m.tokenize(text)
        return np.concatenate([np.asarray(pre, np.int32), body]).astype(np.int32), text

    def _template_text(self, q: str) -> str:
        """Text of a template turn: the rendered conversation ending in ``q`` after the cached text."""
        fmt, doc = self.fmt, bool(self.cache.n_cells)
        turns = self._tpl_turns if len(self._tpl_turns) == len(self._turns) else []
        why = "a raw turn or a dropped turn precedes" if len(turns) != len(self._turns) else ""
        cached = "".join(t[3] for t in turns)
        if any(t[0] is None for t in turns):
            why = "a raw turn precedes"
        for k in (2, 1):  # answers as decoded, then as shown (SentencePiece's leading space stripped)
            if why:
                break
            rendered = fmt.render(fmt.messages([(t[0], t[k]) for t in turns], q, doc))
            if doc:
                if rendered.count(DOC) != 1 or not rendered.startswith(fmt.doc_head + DOC):
                    why = "the rendered text before the document changed"
                    break
                rendered = rendered[len(fmt.doc_head) + len(DOC):]
            if rendered.startswith(cached):
                return rendered[len(cached):]
            why = "the template rewrites earlier turns"
        log.warning("chat template: %s; laying out this turn from the template's placeholder rendering", why)
        if self._turns:
            return fmt.later.replace(Q2, q)
        return fmt.first.replace(Q1, q) if doc else fmt.solo.replace(Q1, q)

    # --- room ------------------------------------------------------------------------------------------
    def _drop_turn(self, i: int) -> None:
        """Remove turn ``i``'s cells and close the gap (later turns move down with seq_add)."""
        p0, p1 = self._turns[i]
        if i == len(self._turns) - 1 or len(self._turns) == 1:
            self.bridge.remove_from(p0)
        else:
            self.bridge.remove_from(p0, p1)
            self.bridge.shift_positions(p1, -1, -(p1 - p0))
        d = p1 - p0
        if len(self._tpl_turns) == len(self._turns):
            self._tpl_turns.pop(i)
        self._turns = [t if j < i else (t[0] - d, t[1] - d) for j, t in enumerate(self._turns) if j != i]
        if not self._turns:
            self._pending, self._chat_tail, self._chat_last = [], "", None
        log.info("dropped chat turn %d (%d cells) to make room", i, d)

    def _fit(self, q: str, max_new: int, raw: bool = False, prefix: str = "") -> tuple[np.ndarray, str, int]:
        """Question tokens, their text and the answer length that fit, dropping old turns as needed."""
        while True:
            toks, text = self.question(q, raw, prefix)
            if len(toks) == 0:
                raise ValueError("the question adds no tokens")
            free = self.ctx.n_ctx - self.bridge.n_cells()
            if len(toks) + max_new <= free:
                return toks, text, max_new
            if not self._turns:
                if len(toks) + 1 > free:
                    raise ValueError(f"the question needs {len(toks)} cells but only {free} are free "
                                     f"(n_ctx {self.ctx.n_ctx}, document {self.cache.n_cells} cells); "
                                     "ask a shorter question, use a larger n_ctx or a smaller budget")
                log.warning("answer limited to %d tokens (context full)", free - len(toks))
                return toks, text, free - len(toks)
            self._drop_turn(1 if len(self._turns) > 1 else 0)

    # --- public ----------------------------------------------------------------------------------------
    def ask(self, question: str, *, max_new_tokens: int = 256, temperature: float = 0.0, raw: bool = False,
            answer_prefix: str = ""):
        """Stream the answer to ``question`` as text pieces (an iterator of str).

        Greedy by default; ``temperature > 0`` samples with the session's seeded generator.  ``raw=True``
        skips the chat template: ``question`` is appended to the cache exactly as given (for prompts with
        an answer cue, as in the benchmark's tasks).  ``answer_prefix``: text the answer starts with, laid after
        the template's generation prompt (RULER's answer cues); it is not streamed.  Raises ValueError for an empty question or bad
        limits (before anything changes).
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        self.close_active()
        q = question if raw else question.strip()
        if not isinstance(answer_prefix, str):
            raise ValueError("answer_prefix must be a string")
        toks, text, n_new = self._fit(q, int(max_new_tokens), raw, answer_prefix)
        gen = self._generate(q, toks, text, n_new, float(temperature), raw)
        self._active = gen
        return gen

    def peek_logits(self, question: str, *, raw: bool = False) -> np.ndarray:
        """float32[n_vocab]: next-token logits after ``question`` (as :meth:`ask` would see them); the
        cache is left unchanged."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        self.close_active()
        toks, _, _ = self._fit(question if raw else question.strip(), 1, raw)
        p0 = self.ctx.n_past
        try:
            return self._decode_tokens(toks)
        finally:
            self.bridge.remove_from(p0)

    def reset(self) -> None:
        """Forget every chat turn; the document cache stays."""
        self.close_active()
        if self._turns:
            self.bridge.remove_from(self._turns[0][0])
        self._turns, self._pending, self._chat_tail, self._chat_last = [], [], "", None
        self._tpl_turns = []

    # --- generation ------------------------------------------------------------------------------------
    def close_active(self) -> None:
        """Close the answer stream in progress, if any (its partial turn is kept)."""
        if self._active is not None:
            gen, self._active = self._active, None
            gen.close()

    def _decode_tokens(self, toks: np.ndarray) -> np.ndarray:
        nb = self.ctx.n_batch
        logits = None
        for i in range(0, len(toks), nb):
            part = toks[i:i + nb]
            logits = self.ctx.decode(part, logits="last" if i + nb >= len(toks) else "none")
        return logits

    def _sample(self, logits: np.ndarray, temperature: float) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(self._rng.choice(len(p), p=p / p.sum()))

    def _generate(self, q: str, toks: np.ndarray, text: str, n_new: int, temperature: float, raw: bool = False):
        p_start = self.ctx.n_past
        saved = (list(self._turns), list(self._pending), self._chat_tail, self._chat_last)
        tpl_saved = list(self._tpl_turns)
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        filt = StopFilter(self.fmt.stop)
        decoded_text, undecoded, n_gen, last_decoded = [], None, 0, int(toks[-1])
        committed = []
        t0 = time.perf_counter()

        def commit() -> None:
            if committed:
                return
            committed.append(True)
            answer = "".join(decoded_text)
            base = tpl_saved if len(tpl_saved) == len(self._turns) else []
            self._tpl_turns = base + [(None if raw else q, filt.text, answer, text + answer)]
            self._turns.append((p_start, self.ctx.n_past))
            self._pending = [undecoded] if undecoded is not None else []
            self._chat_tail = ((self._chat_tail or self.cache.tail) + text + answer)[-TAIL_CHARS:]
            keep = undecoded is not None and not self.is_end(undecoded)
            self._chat_last = undecoded if keep else last_decoded
            self.t_decode += time.perf_counter() - t0
            self.tokens_generated += n_gen
            self._active = None

        try:
            logits = self._decode_tokens(toks)
            while True:
                tok = self._sample(logits, temperature)
                n_gen += 1
                undecoded = tok
                if self.is_end(tok):
                    break
                piece = dec.decode(self.model.piece(tok))
                decoded_text.append(piece)
                out, stop = filt.push(piece)
                if out:
                    yield out
                if stop or n_gen >= n_new:
                    break
                logits = self.ctx.decode(np.array([tok], np.int32))
                undecoded, last_decoded = None, tok
            rest = filt.flush() + dec.decode(b"", final=True)
            commit()
            if rest:
                yield rest
        except GeneratorExit:
            commit()
            raise
        except BaseException:
            self.bridge.remove_from(p_start)
            self._turns, self._pending, self._chat_tail, self._chat_last = saved
            self._tpl_turns = tpl_saved
            self._active = None
            if self.ctx.n_past != p_start:
                raise KVMergeError("could not roll the cache back after a failed answer; ingest again")
            raise
