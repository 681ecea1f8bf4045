"""Answer matching for blackbox attacks; implemented in :mod:`probe.matching` (shared with the
defense metrics' generation accuracy)."""

from probe.matching import answer_matches, normalize_answer

__all__ = ["answer_matches", "normalize_answer"]
