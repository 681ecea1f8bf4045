"""The attack interface shared by every non-logit-lens attack (blackbox, relearning, probes).

The logit-lens attacks (:mod:`attacks.whitebox`) are scored together from one lens sweep; every
other attack is a small class with a :meth:`Attack.run` method that maps facts on one model state
to one :class:`AttackOutcome` per fact, registered by CLI name with :func:`register`::

    @register("my-attack")
    @dataclass
    class MyAttack(Attack):
        kind = "blackbox"
        def budget(self, n_layers): return 20
        def run(self, model, facts, ctx): ...

Attack success@B (Patil, Hase & Bansal, ICLR 2024, section 3) is the fraction of facts whose
outcome has ``success=True``; every attack is run on the model before and after the deletion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

ATTACKS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator registering an :class:`Attack` under a CLI name."""
    def deco(cls: type) -> type:
        cls.cli_name = name
        ATTACKS[name] = cls
        return cls
    return deco


@dataclass
class AttackContext:
    """What an attack may use besides the model it attacks.

    Attributes:
        facts: every fact of the run (a pool for distractors, relearning data and probe training).
        deleted: ids of the facts being deleted in this run; attackers never train on them.
        seed: base seed; attacks derive per-fact seeds from it and the fact id (reproducible,
            independent of batching and of resume).
        progress: show progress bars.
        cache: per-model-state scratch space (e.g. probes trained on this model state), keyed by
            the attack; the caller gives a fresh dict for every model state.
    """

    facts: Sequence[Any] = ()
    deleted: frozenset = frozenset()
    seed: int = 0
    progress: bool = False
    cache: dict = field(default_factory=dict)


@dataclass
class AttackOutcome:
    """The result of one attack on one fact.

    Attributes:
        success: the answer is in the attack's candidate set of size ``budget``.
        budget: the candidate-set size B this outcome was judged at.
        best_rank: for rank-based attacks, the best (smallest, 1-based) rank of the answer's
            first token over the candidate lists (``success == best_rank <= k``); else None.
        layer_ranks: per decoder layer, the answer's rank under this attack's readout (tuned lens,
            probe), or None.
        samples: blackbox attacks: the sampled continuations (text), or None.
        hits: blackbox attacks: how many samples contain the answer.
        details: anything else worth keeping (JSON-serialisable).
        skipped: why the attack could not run on this fact (e.g. an image fact without
            paraphrase images for ``image-rephrase``), else None. Skipped outcomes are left out of
            attack success and counted separately.
    """

    success: bool
    budget: int
    best_rank: int | None = None
    layer_ranks: list[int] | None = None
    samples: list[str] | None = None
    hits: int | None = None
    details: dict = field(default_factory=dict)
    skipped: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "AttackOutcome":
        return cls(**d)

    @classmethod
    def skip(cls, budget: int, reason: str) -> "AttackOutcome":
        """An outcome for a fact the attack cannot run on (not a failure of the attack)."""
        return cls(success=False, budget=budget, skipped=reason)


class Attack:
    """Base class of registered attacks.

    Attributes:
        cli_name: the registered name (set by :func:`register`).
        kind: ``"whitebox"``, ``"blackbox"`` or ``"relearning"``.
    """

    cli_name = "attack"
    kind = "blackbox"

    @property
    def name(self) -> str:
        return self.cli_name

    def budget(self, n_layers: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, model, facts: Sequence[Any], ctx: AttackContext) -> list[AttackOutcome]:  # pragma: no cover
        """One :class:`AttackOutcome` per fact, on ``model`` as it is (edited or not)."""
        raise NotImplementedError

    def config(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
