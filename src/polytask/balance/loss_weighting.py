"""Loss-based balancers: they need only the loss values of each step."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.balance.base import LossWeighting
from polytask.balance.registry import BALANCERS


@BALANCERS.register("ew", "equal", "ls")
class EqualWeighting(LossWeighting):
    """Equal weighting (EW, "linear scalarisation"): the update minimises ``Σ_t L_t``.

    The baseline every multi-task optimisation paper compares with (e.g. Navon et al., ICML 2022,
    call it LS).
    """

    def weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses)
