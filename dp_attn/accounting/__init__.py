"""Privacy accounting for Poisson-subsampled Gaussian steps (imports neither torch nor triton).

>>> from dp_attn.accounting import PRVAccountant
>>> acc = PRVAccountant()
>>> acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, count=14063)
>>> round(acc.epsilon(delta=1e-5), 2)  # an upper bound on ε
2.38
"""

from dp_attn.accounting.base import Accountant
from dp_attn.accounting.budget import BudgetExceededError, PrivacyBudget
from dp_attn.accounting.calibration import calibrate_noise_multiplier, calibrate_steps
from dp_attn.accounting.prv import PRVAccountant
from dp_attn.accounting.rdp import RDPAccountant
from dp_attn.accounting.registry import make_accountant
from dp_attn.accounting.schedule import read_schedule
from dp_attn.accounting.steps import Step

__all__ = [
    "Accountant",
    "BudgetExceededError",
    "PRVAccountant",
    "PrivacyBudget",
    "RDPAccountant",
    "Step",
    "calibrate_noise_multiplier",
    "calibrate_steps",
    "make_accountant",
    "read_schedule",
]
