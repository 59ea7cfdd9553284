"""Draft-free speculative decoding: n-gram prompt lookup (`ngram`) and suffix decoding (`suffix`)."""

from common.engine.speculative.speculator import Speculator, accepted_length, make_speculator

__all__ = ["Speculator", "accepted_length", "make_speculator"]
