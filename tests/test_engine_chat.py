"""Chat formats and the seam rule: the question's tokens continue the document's exactly as if the whole
text had been tokenized at once (no spurious leading-space token)."""
from __future__ import annotations

import numpy as np
import pytest

from kvmerge_local import Session
from kvmerge_local.bridge import LlamaContext
from kvmerge_local.engine.chat import FORMATS, StopFilter, detect_format

pytestmark = pytest.mark.llama

LLAMA2_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}<<SYS>>\\n{{ message['content'] }}"
                   "\\n<</SYS>>\\n\\n{% elif message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] "
                   "+ ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
DOC = "The lighthouse on Kell Island was built in 1871.\nIts keeper, Ada Rune, kept a log of every storm."


@pytest.fixture(scope="module")
def chat_model(tiny_model_factory):
    return tiny_model_factory(chat_template=LLAMA2_TEMPLATE)


@pytest.fixture(scope="module")
def raw_model(tiny_model_factory):
    return tiny_model_factory()


def _joint(s, text):
    return s.model.tokenize(text, add_bos=True)


def test_llama2_override_first_turn_is_llama2_reference(chat_model):
    with Session.open(chat_model, n_ctx=512, n_threads=2) as s:
        assert s.fmt.name == "gguf"  # the GGUF's own template is the default (tests/test_chat_templates.py)
    with Session.open(chat_model, n_ctx=512, n_threads=2, budget=1.0, chat_format="llama2") as s:
        assert s.fmt.name == "llama2"
        s.ingest(DOC)
        q = "When was it built?"
        doc_toks = _joint(s, "[INST] " + DOC)
        whole = _joint(s, "[INST] " + DOC + "\n\n" + q + " [/INST]")
        got = s.chat.question_tokens(q)
        np.testing.assert_array_equal(np.concatenate([doc_toks, got]), whole)
        naive = s.model.tokenize("\n\n" + q + " [/INST]")
        assert not np.array_equal(naive, got) and len(naive) == len(got) + 1  # the spurious "▁"
        assert whole[0] == s.model.info["bos"]
        "".join(s.ask(q, max_new_tokens=3))
        # a later turn: </s><s> then "[INST] q [/INST]" encoded on its own (Meta's reference layout)
        q2 = "Who kept the log?"
        t2 = s.chat.question_tokens(q2)
        eos, bos = s.model.info["eos"], s.model.info["bos"]
        body = s.model.tokenize("[INST] " + q2 + " [/INST]")
        np.testing.assert_array_equal(t2[-len(body):], body)
        assert list(t2[-len(body) - 2:-len(body)]) == [eos, bos]
        assert len(t2) - len(body) in (2, 3)  # plus the pending answer token when the answer was cut short


def test_raw_format_seam_and_later_turns(raw_model):
    with Session.open(raw_model, n_ctx=512, n_threads=2, budget=1.0) as s:
        assert s.fmt.name == "raw"
        s.ingest(DOC)
        q = "When was it built?"
        whole = _joint(s, DOC + "\n\nQuestion: " + q + "\nAnswer:")
        got = s.chat.question_tokens(q)
        np.testing.assert_array_equal(whole[-len(got):], got)
        assert len(_joint(s, DOC)) + len(got) == len(whole)
        cue = "\n\nQuestion: Who kept the log?\nAnswer: The keeper was"
        np.testing.assert_array_equal(s.chat.question_tokens(cue, raw=True), _joint(s, DOC + cue)[len(_joint(s, DOC)):])
        "".join(s.ask(q, max_new_tokens=4))
        t2 = s.chat.question_tokens("And the keeper?")
        assert len(t2) > 0 and t2[0] != s.model.tokenize("\n")[0]  # no spurious leading space token


def test_question_without_document(raw_model):
    with Session.open(raw_model, n_ctx=256, n_threads=2) as s:
        toks = s.chat.question_tokens("Hello?")
        np.testing.assert_array_equal(toks, _joint(s, "Question: Hello?\nAnswer:"))
        answer = "".join(s.ask("Hello?", max_new_tokens=6))
        # the same greedy answer, decoded independently on a fresh context: argmax token by token, stopped at
        # the end of generation, pieces joined and filtered as the session streams them
        with LlamaContext(s.model, n_ctx=256, n_threads=2, flash_attn=s.flash_attn) as ctx:
            logits, pieces = ctx.decode(toks), []
            for _ in range(6):
                tok = int(np.argmax(logits))
                if s.model.is_eog(tok) or tok in getattr(s.fmt, "end_ids", ()):
                    break
                pieces.append(s.model.piece(tok))
                logits = ctx.decode(np.array([tok], np.int32))
        assert pieces, "the tiny model ends at once: nothing to compare"
        filt = StopFilter(s.fmt.stop)
        text, stopped = filt.push(b"".join(pieces).decode("utf-8", "replace"))
        assert answer == text + ("" if stopped else filt.flush())


def test_format_override_and_name_detection(raw_model):
    class Fake:
        def __init__(self, name, file="model.gguf"):
            from pathlib import Path

            self.name, self.path = name, Path(file)

        def meta(self, key):
            return self.name if key == "general.name" else None

    assert detect_format(Fake("LLaMA v2 chat")).name == "raw"
    assert detect_format(Fake("llama-2-7b-chat")).name == "llama2"
    assert detect_format(Fake("Mistral-7B-Instruct-v0.2")).name == "mistral"
    assert detect_format(Fake("LLaMA v2", "llama-2-13b-chat.Q5_K_M.gguf")).name == "llama2"
    assert detect_format(Fake("LLaMA v2", "llama-2-13b.Q5_K_M.gguf")).name == "raw"
    assert detect_format(Fake("x"), "mistral") is FORMATS["mistral"]
    with pytest.raises(ValueError, match="unknown chat format"):
        detect_format(Fake("x"), "chatml")


def test_stop_filter_holds_back_partial_stop_strings():
    f = StopFilter(("\nQuestion:",))
    out = []
    for piece in [" The", " answer", ".\n", "Ques", "tion:", " more"]:
        text, stop = f.push(piece)
        out.append(text)
        if stop:
            break
    assert "".join(out) == "The answer." and stop
    g = StopFilter(())
    assert g.push(" hi")[0] == "hi" and g.push(" there")[0] == " there" and g.flush() == ""
