"""The text stream: generated ids → the answer's visible text. Stop ids and stop strings, UTF-8
split across tokens, the one leading space, finish reasons, and a cost linear in the answer."""

import pytest

from rksmolvlm.processing.prompt import TextTokenizer
from rksmolvlm.runtime.text_stream import TextStream

EOU = 49279  # <end_of_utterance> in the idefics3-256m layout


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    return TextTokenizer(tiny_checkpoints["idefics3-256m"] / "tokenizer.json")


def chars(tokenizer, text):
    """One id per character (ASCII): full control over where token boundaries fall."""
    ids = [tokenizer.encode_text(c) for c in text]
    assert all(len(i) == 1 for i in ids)
    return [i[0] for i in ids]


def run(stream, ids, aborted=False):
    """Push ids until the stream is done, then close it; returns the deltas (empty ones dropped)."""
    deltas = []
    for token in ids:
        if stream.done:
            break
        deltas.append(stream.push(token))
    deltas.append(stream.close(aborted))
    return [d for d in deltas if d]


def test_a_stop_id_ends_the_answer_and_is_not_shown(tokenizer):
    stream = TextStream(tokenizer, {EOU}, 50)
    ids = tokenizer.encode_text(" Hello world")
    deltas = run(stream, ids + [EOU] + tokenizer.encode_text(" more"))
    assert stream.finish_reason == "stop" and stream.done and not stream.cut
    assert stream.token_ids == ids + [EOU]  # kept in the ids, the rest never pushed
    assert "".join(deltas) == stream.text == "Hello world"
    assert stream.push(ids[0]) == "" and stream.token_ids == ids + [EOU]  # done: no more ids
    assert stream.close() == "" and stream.finish_reason == "stop"


def test_any_of_several_stop_ids(tokenizer):
    stream = TextStream(tokenizer, {EOU, 2}, 50)
    run(stream, tokenizer.encode_text(" a b") + [2, EOU])
    assert stream.finish_reason == "stop" and stream.token_ids[-1] == 2 and stream.text == "a b"


def test_a_stop_string_across_deltas_cuts_the_text(tokenizer):
    stream = TextStream(tokenizer, {EOU}, 100, stop_strings=["STOP"])
    ids = chars(tokenizer, " Count: 1 2 3 STOP 4 5")
    shown = []
    for token in ids:
        shown.append(stream.push(token))
        if stream.done:
            break
    assert stream.done and stream.cut and stream.finish_reason == "stop"
    assert stream.text == "".join(shown) == "Count: 1 2 3 "
    assert len(stream.token_ids) == ids.index(chars(tokenizer, "P")[0]) + 1  # ended on the string's last token
    assert stream.close() == "" and stream.finish_reason == "stop"


def test_a_partial_stop_string_is_held_back_then_released(tokenizer):
    stream = TextStream(tokenizer, {EOU}, 100, stop_strings=["cat"])
    seen = ""
    for token in chars(tokenizer, " a ca"):
        seen += stream.push(token)
    assert seen == "a " and not stream.done  # "ca" may become "cat": held back
    seen += stream.push(chars(tokenizer, "b")[0])
    assert seen == "a cab"  # it did not: released
    for token in chars(tokenizer, " and a cat!"):
        seen += stream.push(token)
    assert seen == stream.text == "a cab and a " and stream.cut


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    stream = TextStream(tokenizer, {EOU}, 100, stop_strings=["world", "lo w", ""])
    deltas = run(stream, tokenizer.encode_text(" Hello world"))
    assert "".join(deltas) == stream.text == "Hel" and stream.finish_reason == "stop"


def test_a_stop_string_completed_by_the_last_flush(tokenizer):
    stream = TextStream(tokenizer, {EOU}, 100, stop_strings=["é!"])
    ids = tokenizer.encode_text(" café!")
    assert len(ids) >= 3
    deltas = run(stream, ids)
    assert "".join(deltas) == stream.text == "caf" and stream.cut and stream.finish_reason == "stop"


def test_held_text_that_never_becomes_a_stop_string_is_shown_at_the_end(tokenizer):
    stream = TextStream(tokenizer, {EOU}, 100, stop_strings=["cat"])
    deltas = run(stream, chars(tokenizer, " a ca") + [EOU])
    assert "".join(deltas) == stream.text == "a ca" and stream.finish_reason == "stop" and not stream.cut
    stream = TextStream(tokenizer, {EOU}, 5, stop_strings=["cat"])
    deltas = run(stream, chars(tokenizer, " a ca"))
    assert "".join(deltas) == "a ca" and stream.finish_reason == "length"


@pytest.mark.parametrize("text", [" café naïve", " 🙂 emoji, 中文 and ü", "ü", " \u00e9\u0301 combining"])
def test_multibyte_utf8_split_across_tokens(tokenizer, text):
    ids = tokenizer.encode_text(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some character spans several tokens
    stream = TextStream(tokenizer, {EOU}, 100)
    deltas = run(stream, ids)
    assert all("\ufffd" not in d for d in deltas)
    full = tokenizer.decode(ids)
    assert "".join(deltas) == stream.text == (full[1:] if full.startswith(" ") else full)


def test_an_unfinished_character_at_the_end_is_flushed(tokenizer):
    ids = tokenizer.encode_text(" ok 🙂")[:-1]  # the emoji's last byte never comes
    stream = TextStream(tokenizer, {EOU}, len(ids))
    pushed = [stream.push(i) for i in ids]
    assert all("\ufffd" not in d for d in pushed)
    tail = stream.close()
    assert tail.endswith("\ufffd") and "".join(pushed) + tail == tokenizer.decode(ids)[1:]
    assert stream.finish_reason == "length"


@pytest.mark.parametrize("text,shown", [(" Hello", "Hello"), ("Hello", "Hello"), ("  two", " two"),
                                        (" ", ""), (" a b", "a b")])
def test_one_leading_space_is_dropped(tokenizer, text, shown):
    stream = TextStream(tokenizer, {EOU}, 100)
    assert "".join(run(stream, tokenizer.encode_text(text))) == stream.text == shown


def test_the_leading_space_as_its_own_token(tokenizer):
    stream = TextStream(tokenizer, {EOU}, 100)
    ids = chars(tokenizer, " x") + chars(tokenizer, " y")
    assert [stream.push(i) for i in ids] == ["", "x", " ", "y"]


def test_a_leading_space_after_a_held_character(tokenizer):
    ids = tokenizer.encode_text("é")  # two byte tokens: the first delta is empty
    stream = TextStream(tokenizer, {EOU}, 100)
    assert stream.push(ids[0]) == "" and stream.push(ids[1]) == "é"
    assert stream.push(chars(tokenizer, " ")[0]) + stream.close() == " "  # not the leading space any more


def test_finish_reasons(tokenizer):
    ids = tokenizer.encode_text(" one two three")
    stream = TextStream(tokenizer, {EOU}, len(ids))
    run(stream, ids)
    assert stream.finish_reason == "length"
    stream = TextStream(tokenizer, {EOU}, len(ids) + 5)
    run(stream, ids)
    assert stream.finish_reason == "stop"  # the engine ended on its own
    stream = TextStream(tokenizer, {EOU}, len(ids))
    run(stream, ids[:2], aborted=True)
    assert stream.finish_reason == "abort" and stream.text == "one"
    stream = TextStream(tokenizer, {EOU}, len(ids))
    run(stream, ids, aborted=True)
    assert stream.finish_reason == "abort"  # an abort wins over the length it happened to reach
    stream = TextStream(tokenizer, {EOU}, 10)
    run(stream, [EOU], aborted=True)
    assert stream.finish_reason == "stop" and stream.text == ""  # the stop id came first
    stream = TextStream(tokenizer, {EOU}, 10)
    assert stream.close() == "" and stream.finish_reason == "stop" and stream.token_ids == []


def test_first_token_time(tokenizer):
    import time

    stream = TextStream(tokenizer, {EOU}, 10, started=time.perf_counter() - 0.05)
    assert stream.first_token_ms == 0
    stream.push(tokenizer.encode_text("a")[0])
    first = stream.first_token_ms
    assert first >= 50
    stream.push(tokenizer.encode_text("b")[0])
    assert stream.first_token_ms == first


class CountingDecodes:
    """The tokenizer, counting how many ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens)


@pytest.mark.parametrize("stop_strings", [(), ("never appears here",)])
def test_detokenizing_is_linear_in_the_answer(tokenizer, stop_strings):
    sentence = tokenizer.encode_text(" The quick brown fox jumps over the lazy dog. Café 🙂")
    cost = {}
    for n in (1000, 2000):
        ids = (sentence * (n // len(sentence) + 1))[:n]
        counting = CountingDecodes(tokenizer)
        stream = TextStream(counting, {EOU}, n, stop_strings=stop_strings)
        deltas = run(stream, ids)
        assert len(stream.token_ids) == n and stream.finish_reason == "length"
        assert "".join(deltas) == tokenizer.decode(ids)[1:]
        cost[n] = counting.decoded
    assert cost[2000] < 4 * 2000, cost  # a decode of the whole answer per token would be ~2,000,000
    assert cost[2000] < 2.2 * cost[1000], cost


def test_tokens_that_show_nothing_keep_the_cost_linear(tokenizer):
    """A run of generated tokens that decode to nothing (special tokens other than the stop ids)
    must not widen the decode window without bound."""
    invisible = tokenizer.token_id("<image>")
    ids = tokenizer.encode_text(" a") + [invisible] * 1998 + tokenizer.encode_text(" b")
    counting = CountingDecodes(tokenizer)
    stream = TextStream(counting, {EOU}, len(ids))
    deltas = run(stream, ids)
    assert "".join(deltas) == "a b" and stream.finish_reason == "length"
    assert counting.decoded < 4 * len(ids), counting.decoded
