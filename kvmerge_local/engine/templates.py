"""The GGUF's own chat template (``tokenizer.chat_template``), rendered with Jinja as transformers does.

The document is prefilled before any question exists, so the template is probed once with placeholder
contents to find where the document goes: ``render([user: DOC + "\\n\\n" + Q])`` splits into
``doc_head`` (everything before the document: system prompt, role headers, BOS text) and the rest.  At
question time the engine renders the real conversation -- the first user turn holds the document and
the first question, later turns follow as the template lays them out -- and feeds the rendered text
after what is already cached (see :mod:`.conversation`).

Rendering follows transformers' ``apply_chat_template``: an immutable sandboxed environment with
``trim_blocks``/``lstrip_blocks`` and ``loopcontrols``, a ``tojson`` filter that does not HTML-escape,
the globals ``raise_exception`` and ``strftime_now``, and the variables ``messages``, ``bos_token``,
``eos_token`` (the vocabulary's BOS/EOS text) and ``add_generation_prompt``.

Special tokens: rendered text is tokenized with special-token parsing on (``<|im_start|>`` is one token),
the document included, as llama.cpp's server does for a rendered prompt.  BOS: when the rendering starts
with the BOS text, the tokenizer adds no second one (``add_bos`` False).

Errors: a template that is not valid Jinja, raises (``raise_exception``) or does not place the document
and question in order raises :class:`ChatTemplateError`; :func:`~.chat.detect_format` logs it and falls
back to the name heuristics (llama2 / mistral / raw) for a GGUF's own template, and lets it propagate for
an explicit ``chat_format="gguf"`` or an explicit template string.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

log = logging.getLogger(__name__)

# placeholders: plain ASCII words no template rewrites (no whitespace to trim, no reasoning tags)
DOC = "Xkvm0documentX"
Q1, A1, Q2 = "Xkvm1questionX", "Xkvm2answerX", "Xkvm3questionX"
JOIN = "\n\n"  # between the document and the first question, inside the first user turn


class ChatTemplateError(ValueError):
    """A chat template that cannot be compiled or rendered, or that does not lay out a document chat."""


def _raise(message: str):
    raise ChatTemplateError(f"the chat template raised: {message}")


def _tojson(x, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str):
    """A compiled ``jinja2.Template`` of ``source`` (cached); ChatTemplateError if it is not valid Jinja."""
    import jinja2  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {exc}") from exc


def render(source: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True) -> str:
    """The text of ``messages`` (``[{"role": ..., "content": ...}, ...]``) laid out by the template."""
    tmpl = compile_template(source)
    try:
        return tmpl.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                           add_generation_prompt=add_generation_prompt)
    except ChatTemplateError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside the template is the template's
        raise ChatTemplateError(f"the chat template failed to render: {type(exc).__name__}: {exc}") from exc


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@dataclass(frozen=True, eq=False)
class TemplateFormat:
    """A document chat laid out by a Jinja chat template (the ``gguf`` format).

    ``doc_head``: rendered text before the document; ``first``: text after the document up to the
    answer for the first question (``Q1`` placeholder); ``solo``: a first question without a document;
    ``later``: text after an answer up to the next answer (``Q2`` placeholder) -- these three are the
    fallbacks when a real rendering does not continue the cached text.  ``stop``: strings that end an
    answer; ``end_ids``: token ids that end an answer besides the vocabulary's end-of-generation tokens;
    ``add_bos``: whether the tokenizer must add BOS (the template does not render it); ``special``:
    tokenize with special-token parsing.
    """

    name: str
    source: str
    bos_token: str
    eos_token: str
    doc_head: str
    first: str
    solo: str
    later: str
    stop: tuple[str, ...]
    end_ids: tuple[int, ...]
    add_bos: bool
    special: bool = True

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Rendered text of ``messages`` with this format's BOS/EOS text."""
        return render(self.source, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                      add_generation_prompt=add_generation_prompt)

    def messages(self, turns: list[tuple[str, str]], question: str, document: bool) -> list[dict]:
        """The conversation: earlier ``(question, answer)`` turns and the new ``question``; the first user
        turn holds the document placeholder ``DOC`` when ``document`` (the document itself is cached)."""
        out: list[dict] = []
        for q, a in turns:
            out += [_user(q), _assistant(a)]
        out.append(_user(question))
        if document:
            out[0] = _user(DOC + JOIN + out[0]["content"])
        return out


def _token_text(model, tok: int) -> str:
    return model.piece(int(tok)).decode("utf-8", "replace") if 0 <= int(tok) < model.n_vocab else ""


def _is_special(model, tok: int) -> bool:
    """Whether ``tok`` is a control token (its text only becomes it with special-token parsing)."""
    text = _token_text(model, tok)
    return bool(text) and list(model.tokenize(text, special=True)) == [int(tok)] \
        and list(model.tokenize(text, special=False)) != [int(tok)]


def _end_of_turn(model, sep: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Stop strings and end token ids from ``sep``, the text the template puts after an answer: its
    first control token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<|end|>``...), else (a plain-text
    template) the separator up to the next question as a stop string."""
    for t in model.tokenize(sep, special=True):
        if _is_special(model, int(t)):
            return (_token_text(model, t),), (int(t),)
        if _token_text(model, t).strip():
            break
    s = sep.rstrip()
    return ((s,) if s.strip() else ()), ()


def _split(text: str, mark: str, what: str) -> tuple[str, str]:
    if text.count(mark) != 1:
        raise ChatTemplateError(f"the chat template does not render the {what} exactly once")
    i = text.index(mark)
    return text[:i], text[i + len(mark):]


def template_format(model, template: str | None = None, *, name: str = "gguf") -> TemplateFormat:
    """The :class:`TemplateFormat` of ``template`` (default: the model's ``tokenizer.chat_template``).

    ``model``: a loaded :class:`~kvmerge_local.bridge.LlamaModel` (vocabulary for BOS/EOS text and the
    end-of-turn token).  Raises ChatTemplateError for a missing, invalid or unusable template.
    """
    src = template if template is not None else (model.meta("tokenizer.chat_template") or "")
    if not src.strip():
        raise ChatTemplateError("the model has no chat template (tokenizer.chat_template)")
    bos, eos = _token_text(model, model.info["bos"]), _token_text(model, model.info["eos"])
    fmt_kw = {"bos_token": bos, "eos_token": eos}
    first_text = render(src, [_user(DOC + JOIN + Q1)], **fmt_kw)
    head, first = _split(first_text, DOC, "document")
    if Q1 not in first:
        raise ChatTemplateError("the chat template does not render the question after the document")
    solo = render(src, [_user(Q1)], **fmt_kw)
    _split(solo, Q1, "question")
    conv = render(src, [_user(DOC + JOIN + Q1), _assistant(A1), _user(Q2)], **fmt_kw)
    before, later = _split(conv, A1, "answer")
    if Q2 not in later:
        raise ChatTemplateError("the chat template does not render a later question after the answer")
    if not before.startswith(first_text):
        log.warning("the chat template lays out an answered turn differently from its generation prompt; "
                    "later turns follow the template's layout of history where it continues the cache")
    stop, end_ids = _end_of_turn(model, later[:later.index(Q2)])
    return TemplateFormat(name=name, source=src, bos_token=bos, eos_token=eos, doc_head=head, first=first,
                          solo=solo, later=later, stop=stop, end_ids=end_ids,
                          add_bos=not (bos and head.startswith(bos)))
