"""AdaTT: adaptive task-to-task fusion.

Li, Liu, Zeng, Bao, Hong, Wang, Hu, Li, Sun, Zhang, Ding, Zou, Song, "AdaTT: Adaptive Task-to-Task
Fusion Network for Multitask Learning in Recommendations", KDD 2023.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain

from torch import Tensor, nn

from polytask.nn.base import TaskHeads, check_positive, check_widths
from polytask.nn.embedding import FeatureSpec, input_layer
from polytask.nn.moe import ExtractionLevel, RoutedModel, per_task
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


@ARCHITECTURES.register("adatt", "adatt_sp")
class AdaTT(RoutedModel):
    """AdaTT-sp (with shared experts) or AdaTT (``shared_experts=0``).

    Every task owns ``task_experts`` experts per fusion level (plus ``shared_experts`` shared ones).
    Task ``t``'s fusion unit mixes *all* experts of the level with a softmax gate read from its own
    stream, and adds a learnable linear combination of its own experts (the "native expert"
    residual, weights initialised to 1)::

        f_t = Σ_i v_t,i E_t,i(x_t) + Σ_j g_t(x_t)_j E_j(x_j)

    Below the last level, a shared gate over all experts forms the shared stream that the next
    level's shared experts read. Experts of a level run as two batched ops (task experts, shared
    experts), gates as one.

    Shared vs task-specific parameters: a task's gate weighs other tasks' experts, so every expert
    counts as shared; the last level's task gates and native weights and the towers are task-specific.
    ``gate_weights[task]``: the last level's gate ``(B, T·task_experts + shared_experts)``, experts
    ordered task-major then shared. ``shared_features``: the per-task fusion outputs ``(T, B, H)``.

    Args:
        input_dim: dense width or a FeatureSpec.
        num_levels: fusion levels (>= 1); task_experts: experts per task (>= 1);
        shared_experts: shared experts (>= 0); expert: hidden widths of each expert;
        tower, activation, dropout: as in :class:`~polytask.nn.moe.MMoE`.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], num_levels: int = 2,
                 task_experts: int = 1, shared_experts: int = 1, expert: Sequence[int] = (64,),
                 tower: Sequence[int] = (32,), activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__(tasks)
        check_positive("num_levels", num_levels)
        check_positive("task_experts", task_experts)
        check_positive("shared_experts", shared_experts, minimum=0)
        expert = check_widths("expert", expert)
        self.input = input_layer(input_dim)
        widths = [self.input.output_dim] + [expert[-1]] * num_levels
        self.levels = nn.ModuleList(
            ExtractionLevel(len(self.tasks), task_experts, shared_experts, widths[i], expert, activation, dropout,
                            shared_output=i < num_levels - 1 and shared_experts > 0, scope="all", native=True)
            for i in range(num_levels)
        )
        self.heads = TaskHeads(self.tasks, expert[-1], check_widths("tower", tower, True), activation, dropout)

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        last = self.levels[-1]
        return chain(self.heads.parameters(), last.task_gates.parameters(), [last.native])

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.input(x)
        for level in self.levels:  # levels are sequential by design
            h, gates = level(h)
        self.gate_weights = per_task(self.task_names, gates)
        self.shared_features = h
        return self.read_heads(h)
