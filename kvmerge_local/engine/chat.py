"""Chat formats and the tokenization seam.

The document is prefilled long before the question exists, so the question's tokens are produced
separately -- but they must be exactly the tokens the model would see if the whole text (template head,
document, question) had been tokenized at once.  SentencePiece tokenizers (Llama-2, Mistral) prepend a
space to every text they tokenize, so a naive ``tokenize("\\n\\nWhat ...")`` starts with a spurious
``"▁"`` token that the joined text does not have.  :func:`continue_tokens` tokenizes the tail of the text
already in the cache together with the new text and keeps only the new tokens.

Formats (``FORMATS``):

- ``llama2`` (Llama-2-chat, Meta's reference ``[INST]`` layout): ``<s>[INST] {document}\\n\\n{q1} [/INST]
  {a1} </s><s>[INST] {q2} [/INST] ...`` -- later turns are tokenized on their own after ``</s><s>``, as
  the reference code encodes each turn separately.
- ``mistral`` (Mistral-7B-Instruct): as llama2, but later turns follow ``</s>`` without a new ``<s>``.
- ``raw`` (no chat template): ``{document}\\n\\nQuestion: {q}\\nAnswer:`` and the same for later turns,
  which continue the text (seam rule again); generation also stops at ``"\\nQuestion:"``.
- ``gguf`` (the default whenever the GGUF has ``tokenizer.chat_template``): the template itself, rendered
  with Jinja (:mod:`.templates`); the named formats above are overrides.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .templates import ChatTemplateError, TemplateFormat, template_format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatFormat:
    """How documents, questions and answers are laid out for one model family.

    ``doc_head``: text before the document (tokenized with it, after BOS); ``first``: the first question,
    continuing the document (``{q}`` placeholder); ``solo``: a first question without a document;
    ``turn_special``: special tokens ("eos"/"bos") closing an answer before a later turn; ``turn``: a later
    question; ``turn_seam``: whether that text continues the previous text (else tokenized on its own);
    ``stop``: strings that end an answer; ``special``/``add_bos``/``end_ids``: as in
    :class:`~.templates.TemplateFormat` (no special-token parsing, BOS per the vocabulary, no extra end
    tokens).
    """

    name: str
    doc_head: str
    first: str
    solo: str
    turn_special: tuple[str, ...]
    turn: str
    turn_seam: bool
    stop: tuple[str, ...] = ()
    special: bool = False
    add_bos: bool = True
    end_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in ("first", "solo", "turn"):
            if "{q}" not in getattr(self, f):
                raise ValueError(f"ChatFormat.{f} needs a {{q}} placeholder")
        if any(t not in ("eos", "bos") for t in self.turn_special):
            raise ValueError("turn_special entries must be 'eos' or 'bos'")


FORMATS: dict[str, ChatFormat] = {
    "llama2": ChatFormat("llama2", "[INST] ", "\n\n{q} [/INST]", "[INST] {q} [/INST]", ("eos", "bos"),
                         "[INST] {q} [/INST]", False),
    "mistral": ChatFormat("mistral", "[INST] ", "\n\n{q} [/INST]", "[INST] {q} [/INST]", ("eos",),
                          "[INST] {q} [/INST]", False),
    "raw": ChatFormat("raw", "", "\n\nQuestion: {q}\nAnswer:", "Question: {q}\nAnswer:", (),
                      "\n\nQuestion: {q}\nAnswer:", True, ("\nQuestion:",)),
}


#: names ``chat_format=`` / ``--chat-format`` accept: the GGUF's template, or a hand-written format
FORMAT_NAMES = ("gguf", *FORMATS)


def detect_format(model, override: str | None = None) -> ChatFormat | TemplateFormat:
    """The chat format of a loaded model: ``override`` if given (``"gguf"`` raises ChatTemplateError when
    the model has no usable template), else the GGUF's own ``tokenizer.chat_template``
    (:func:`~.templates.template_format`; for a template given as a string, call that directly).  A
    template that does not compile or render is logged and the old heuristics apply: ``<<SYS>>`` ->
    llama2, ``[INST]`` -> mistral, other templates -> raw; without a template, ``general.name`` and the
    file name (Llama-2 *chat* -> llama2, Mistral *instruct* -> mistral), else ``raw``."""
    if override is not None:
        if override == "gguf":
            return template_format(model)
        if override not in FORMATS:
            raise ValueError(f"unknown chat format {override!r}; known: {', '.join(FORMAT_NAMES)}")
        return FORMATS[override]
    tmpl = model.meta("tokenizer.chat_template") or ""
    if tmpl.strip():
        try:
            return template_format(model, tmpl)
        except ChatTemplateError as exc:
            log.warning("chat template of %s is unusable (%s); falling back to a built-in format",
                        getattr(getattr(model, "path", None), "name", "the model"), exc)
    if "<<SYS>>" in tmpl:
        return FORMATS["llama2"]
    if "[INST]" in tmpl:
        return FORMATS["mistral"]
    if tmpl.strip():
        return FORMATS["raw"]
    # TheBloke's Llama-2 GGUFs carry no template and general.name "LLaMA v2": look at the file name too
    path = getattr(model, "path", None)
    name = f"{model.meta('general.name') or ''} {path.name if path is not None else ''}".lower().replace("_", "-")
    if ("llama-2" in name or "llama2" in name) and "chat" in name:
        return FORMATS["llama2"]
    if "mistral" in name and "instruct" in name:
        return FORMATS["mistral"]
    return FORMATS["raw"]


def continue_tokens(model, tail_text: str, last_id: int | None, text: str, special: bool = False) -> np.ndarray:
    """int32[n]: the tokens of ``text`` as they come when it is tokenized together with what precedes it.

    ``tail_text``: the end of the text already in the cache (a few hundred characters are plenty);
    ``last_id``: the id of the last token in the cache (checked against the tail's tokenization).  With
    no tail (empty cache) ``text`` is tokenized on its own.  A seam the tokenizer would merge across
    (the cached last token changes) cannot be honoured without re-decoding; it is logged and the
    tokens after the cached ones are used.  ``special``: parse special-token text (``<|im_end|>``) into
    those tokens.
    """
    if not tail_text:
        return model.tokenize(text, special=special)
    t_tail = model.tokenize(tail_text, special=special)
    full = model.tokenize(tail_text + text, special=special)
    k = len(t_tail)
    clean = len(full) >= k and np.array_equal(full[:k], t_tail)
    if last_id is not None and len(t_tail) and int(t_tail[-1]) != int(last_id):
        clean = False
    if not clean:
        log.warning("tokenizer merges across the seam before %r; the question's first tokens may differ "
                    "from a joint tokenization", text[:20])
        n = 0
        while n < min(k, len(full)) and full[n] == t_tail[n]:
            n += 1
        k = n if n < k else k
    return np.ascontiguousarray(full[k:], dtype=np.int32)


class StopFilter:
    """Streams text while holding back anything that could be the start of a stop string.

    ``push(piece) -> (text_to_emit, stopped)``; ``flush() -> text`` at the end.  The first emitted text
    has its leading spaces removed (SentencePiece answers start with ``"▁"``).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.buf = ""
        self.started = False
        self.text = ""

    def _emit(self, s: str) -> str:
        if not self.started:
            s = s.lstrip(" ")
            self.started = bool(s)
        self.text += s
        return s

    def push(self, piece: str) -> tuple[str, bool]:
        self.buf += piece
        for s in self.stops:
            i = self.buf.find(s)
            if i >= 0:
                out, self.buf = self.buf[:i], ""
                return self._emit(out), True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out, self.buf = (self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]) if hold else (self.buf, "")
        return self._emit(out), False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return self._emit(out)
