"""Admission: whether a stored chunk joins a tier's eviction order as a full member, or is only held
while there is room (the tier's next victim, oldest first, before any the policy orders) and joins
the policy when it is used again (`kvtier.policy.BoundedIndex.add(..., admit=False)`).

A declined chunk is still written to the tiers below, as every stored chunk is (write-through), or
when it is evicted (write-back), so what host memory declines the disk can still serve.

Rules, by name (config: `cpu.admission`):
- `all`: every stored chunk is a full member.
- `whole`: a partial chunk is declined. A prompt's partial last chunk (stored only with
  `save_partial_chunks`, or in a disaggregated prefill) is the one chunk the same conversation's
  next turn never asks for: that turn's prompt continues inside it, so its tokens hash as a new,
  longer chunk. Only an exact repeat of the prompt uses it again, and that use admits it.
"""

from __future__ import annotations

from collections.abc import Callable

# (tokens in the chunk, tokens in a whole chunk) -> admitted
AdmissionRule = Callable[[int, int], bool]


def admit_all(num_tokens: int, chunk_tokens: int) -> bool:
    return True


def admit_whole(num_tokens: int, chunk_tokens: int) -> bool:
    return num_tokens >= chunk_tokens


ADMISSIONS: dict[str, AdmissionRule] = {"all": admit_all, "whole": admit_whole}
DEFAULT_ADMISSION = "whole"


def admission_rule(name: str) -> AdmissionRule:
    """The rule named `name`; ValueError naming the known ones."""
    try:
        return ADMISSIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown admission rule {name!r}; known: {sorted(ADMISSIONS)}") from None
