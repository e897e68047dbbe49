"""Accountants by name, for configuration strings and saved states."""

from __future__ import annotations

from dp_attn.accounting.base import Accountant
from dp_attn.accounting.prv import PRVAccountant
from dp_attn.accounting.rdp import RDPAccountant

ACCOUNTANTS: dict[str, type[Accountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}


def make_accountant(name: str) -> Accountant:
    """A fresh accountant: "prv" (tight, the default elsewhere) or "rdp" (a few % looser)."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {name!r}")
    return ACCOUNTANTS[name]()
