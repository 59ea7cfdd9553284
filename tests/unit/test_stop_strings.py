import random

import pytest

from common.stop_strings import StopStringMatcher


def stream(matcher: StopStringMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush()


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("hello world", ["world"], "hello "),
        ("hello world", ["xyz"], "hello world"),
        ("a.b.c", [".", "b"], "a"),
        ("abcabd", ["abd"], "abc"),
        ("no stops here", [], "no stops here"),
        ("ends with sto", ["stop"], "ends with sto"),
    ],
)
def test_cut_at_first_stop_for_every_split(text, stops, expected):
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(3, len(text) - 1)))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        assert stream(StopStringMatcher(stops), pieces) == expected


def test_partial_match_is_held_then_released():
    m = StopStringMatcher(["</end>"])
    assert m.feed("value </e") == "value "
    assert m.feed("xtra") == "</extra"
    assert m.matched is None


def test_text_after_match_is_dropped():
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc STOP def") == "abc "
    assert m.matched == "STOP"
    assert m.feed("more") == ""
    assert m.flush() == ""


def test_streaming_releases_text_promptly():
    m = StopStringMatcher(["\n\n"])
    # Only the trailing newline can start a stop; everything before it is released at once.
    assert m.feed("Hello there\n") == "Hello there"
    assert m.feed("friend") == "\nfriend"
