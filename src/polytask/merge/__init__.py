"""Merge models fine-tuned per task into one (task vectors), streaming checkpoints of any size.

- :func:`merge_state_dicts` merges in-memory state dicts with a per-tensor method;
- :func:`merge_checkpoints` / :func:`run_merge` stream safetensors checkpoints (single files,
  directories, HF-style shards) tensor by tensor into a new sharded checkpoint;
- :data:`MERGE_METHODS` lists the per-tensor methods: linear, task_arithmetic, ties, dare_linear,
  dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, model_stock, consensus,
  tsv, iso_c, iso_cts, pcb (:mod:`~polytask.merge.methods`); passthrough, nearswap, sce,
  arcee_fusion, ram, ramplus_tl (:mod:`~polytask.merge.selection`); karcher, nuslerp, multislerp
  (:mod:`~polytask.merge.spherical`) -- every method of mergekit 0.1.5;
- mergekit YAML configs run unchanged: ``dtype`` as the compute dtype, ``slices``, per-layer
  gradients and filters (:mod:`~polytask.merge.plan`), multi-document files (mergekit-multi);
  see :mod:`polytask.merge.config` for the few differences;
- PEFT LoRA adapters are inputs of every method (a folder with ``adapter_config.json``, or
  mergekit's ``model+adapter``), read as base + dW; :func:`merge_adapters` merges adapters into an
  adapter and :func:`extract_lora` makes one from a full fine-tune (:mod:`~polytask.merge.lora`);
- :mod:`polytask.merge.data_driven` has the methods that need the model and data: Fisher
  merging, RegMean, AdaMerging (task- and layer-wise) and WEMoE.
"""

from polytask.merge.config import MergeConfig, ModelEntry, load_merge_config, load_merge_configs, run_merge
from polytask.merge.data_driven import (
    WeightEnsemblingMoE,
    adamerging,
    fisher_diagonal,
    fisher_merge,
    regmean_merge,
    wemoe,
)
from polytask.merge.engine import build_method, merge_checkpoints, merge_state_dicts
from polytask.merge.io import (
    Checkpoint,
    CheckpointWriter,
    TensorSpec,
    load_state_dict,
    save_state_dict,
)
from polytask.merge.lora import AdapterCheckpoint, LoraAdapter, extract_lora, merge_adapters
from polytask.merge.methods import MERGE_METHODS, MergeMethod, TensorContext, tall_masks
from polytask.merge import selection as _selection  # noqa: F401  (registers its methods)
from polytask.merge import spherical as _spherical  # noqa: F401  (registers its methods)

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "TensorContext",
    "tall_masks",
    "merge_state_dicts",
    "merge_checkpoints",
    "build_method",
    "run_merge",
    "MergeConfig",
    "ModelEntry",
    "load_merge_config",
    "load_merge_configs",
    "Checkpoint",
    "CheckpointWriter",
    "TensorSpec",
    "load_state_dict",
    "save_state_dict",
    "fisher_diagonal",
    "fisher_merge",
    "regmean_merge",
    "adamerging",
    "wemoe",
    "WeightEnsemblingMoE",
    "merge_adapters",
    "extract_lora",
    "LoraAdapter",
    "AdapterCheckpoint",
]
