"""Models made of several modules (mergekit's ``modules:``): vision-language and encoder-decoder.

mergekit 0.1.5 defines nine architectures as "modular" (its ``_data/architectures/*.json`` of
``kind: modular``); every other architecture is one module, ``default``. A config may then give
each module its own ``models`` or ``slices`` and ``parameters``::

    modules:
      text_decoder:
        slices: [{sources: [{model: a, layer_range: [0, 24]}, {model: b, layer_range: [0, 24]}]}]
        parameters: {t: [0, 0.5, 1]}
      vision_tower:
        models: [{model: a}, {model: b}]

A model whose architecture mergekit does not define (LLaVA, for one) and whose tensors hold
several stacks of numbered layers gets mergekit's inferred modules (its
``infer_architecture_info``): one per stack, named by the text before the first ``.<i>.``
(``model.language_model.layers``), and ``default`` for every tensor outside the layers; no
``config.json`` key is known for their layer counts (a warning when a count changes), except the
LLaVA family's text and vision stacks (``text_config``/``vision_config.num_hidden_layers``, set
here; mergekit sets none).

A top-level ``models:`` list is every module's; a top-level ``slices:`` list is refused (as
mergekit refuses it). Each module is planned as a merge of its own (:func:`plan_config` on the
module's tensors, its layers numbered from 0, its ``parameters`` between the slice's and the
top level's, as mergekit's ``ConfigReader``) and the jobs of all modules form one output.

Module names and their tensors (polytask's table below, checked against mergekit's definitions
in the tests): a tensor belongs to the module whose name prefix is the longest one matching it;
a module's layers are the tensors ``<stack><i>.<rest>``; the tensors before its layers (the
embeddings) come from the sources of its first slice, the others from its last.

Where polytask differs from mergekit: a module is its tensors by prefix, so tensors mergekit's
definition does not list (none in these architectures' checkpoints) are merged too, and a
checkpoint tensor outside every module is dropped with a warning (mergekit drops it silently);
a module left out of ``modules:`` is dropped too, as in mergekit, but with a warning; Whisper's
decoder is ``model.decoder.`` (mergekit's definition lacks the dot and finds no tensor); Qwen2-VL's
projector has no layers here (mergekit reads its two MLP matrices as two "layers" holding the
same tensors, so a gradient there gives the value at ``t = 1`` in mergekit, at ``t = 0`` here).
A tensor that only some sources of a layer have (T5's ``relative_attention_bias`` is in block 0
alone, so block 0 of one model merged with block 1 of another) is refused naming the tensor and
model; mergekit, where its definition marks the tensor optional, merges the sources that have
it. polytask's rule that a gradient must fit the layers it applies to holds per module for a
module's own parameters; a top-level gradient must fit some module (a 3-layer projector does
not refuse a gradient over 36 text layers). The names are the checkpoints' as mergekit defines
them (Gemma 3, Llama 4 and Mistral 3 in the ``language_model.model.*`` layout of their
published checkpoints).

Key layouts (polytask's addition; mergekit 0.1.5 finds no tensor of its modules in them):
transformers 5 names the tensors of Gemma 3, Mistral 3 and Qwen2-VL/2.5-VL as the model holds
them in memory (``model.language_model.layers.<i>.*``, ``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``lm_head.*``, ``model.visual.*``), which is what
``save_pretrained(save_original_format=False)`` and training code that saves ``state_dict()``
write; its default ``save_pretrained`` writes mergekit's names back, except Gemma 3's vision
tower of a model not loaded from a checkpoint (``vision_tower.*`` without ``vision_model.``).
Each such layout is a table of prefix renames from mergekit's names (:data:`NAMINGS`); a
checkpoint's layout is recognised from its tensor names (:func:`naming_of`: a marker prefix
only that layout has; none: mergekit's), and the same module names, slices and layer-count keys
apply (``config.json``'s ``architectures`` says which table; ``transformers_version`` says
nothing reliable, as 4.5x and 5.x wrote both). Inputs of one merge in different layouts are
renamed to the reference's (the base, else the first model) when read, so the output keeps the
reference's layout (:class:`RenamedSource`); tensor names hold the same tensors in every layout,
so this loses nothing. Llama 4, Qwen3-VL(-MoE), T5 and Whisper keep mergekit's names in
transformers 5.25. A T5 file holding the embedding three times (``shared``, ``encoder.`` and
``decoder.embed_tokens``) merges each copy in its own module, as mergekit does, so the copies
differ where the modules' parameters do (transformers then loads them untied).

The LLaVA family (LLaVA, VipLLaVA, PaliGemma, Aya Vision, InternVL, LLaVA-NeXT, -NeXT-Video,
-OneVision, Video-LLaVA), whose modules are inferred, has three layouts (:data:`INFERRED_NAMINGS`,
from transformers 5.25's ``llava``, ``llava_next`` and ``video_llava`` conversion rules and checked
against its saves): published checkpoints' (``language_model.model.*``,
``vision_tower.vision_model.*``), transformers 5's in memory (``model.language_model.*``,
``model.vision_tower.*``, ``model.image_newline``) and its default save of a model it built
(``vision_tower.*`` without ``vision_model.``, as InternVL's tower is named in every file). Inputs are renamed to the
reference's as above; an inferred module's name is its stack's prefix in the reference's layout,
and a config may name it in any layout (``language_model.model.layers`` is
``model.language_model.layers``: :func:`module_names_in_layout`). mergekit 0.1.5 under
transformers 5 infers the in-memory names whatever the files hold (it builds the model), so
its configs name ``model.language_model.layers``; where it cannot build the model it infers the
files' names.

Mllama (Llama 3.2 Vision; modules inferred too: ``language_model.model.layers``,
``vision_model.transformer.layers``, ``vision_model.global_transformer.layers``, ``default``) has
two layouts (transformers 5.25's ``mllama`` rules, checked against its saves): published
checkpoints' (``language_model.model.*``, ``language_model.lm_head.*``, ``vision_model.*``,
``multi_modal_projector.*``), which its default ``save_pretrained`` also writes, and its in-memory
names (``model.language_model.*``, ``lm_head.*``, ``model.vision_model.*``,
``model.multi_modal_projector.*``). Its three stacks' counts are set
(``text_config.num_hidden_layers``, ``vision_config.num_hidden_layers``/``num_global_layers``) and
``text_config.cross_attention_layers`` follows the output layers; ``vision_config``'s
``intermediate_layers_indices`` is left as it is (its length sizes the projector), so a vision
frankenmerge must keep those layers where they are (a warning names it otherwise).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polytask.errors import ConfigError, MergeError, PolytaskError

__all__ = ["Module", "ARCHITECTURES", "INFERRED_NAMINGS", "NAMINGS", "Naming", "RenamedSource", "architecture_name",
           "architecture_of", "inferred_modules", "layout_of", "module_names_in_layout", "memory_naming", "module_of",
           "naming_of", "namings_of", "other_layout_of", "plan_modules", "modules_output_config", "same_naming"]

_EMBED = r"embed|\bwte\b|\bwpe\b"


@dataclass(frozen=True)
class Module:
    """One module: the name prefixes of its tensors, its stack of numbered layers, the
    ``config.json`` keys that may hold its number of layers (each present one is set: a
    transformers 4.5x Qwen2-VL config has both; mergekit sets the first), and the pattern of the
    tensors before its layers."""

    prefixes: tuple[str, ...]
    stack: str | None = None
    layers_keys: tuple[str, ...] = ()
    pre: str = _EMBED


def _vision_language(text: str, stack: str, vision: tuple[str, str, str, str],
                     vision_name: str = "vision_tower") -> dict[str, Module]:
    """A ``language_model.`` text decoder, a projector and a vision encoder (LLaVA-style layout)."""
    prefix, v_stack, v_key, v_pre = vision
    return {"text_decoder": Module((text,), stack, ("text_config.num_hidden_layers",)),
            "multi_modal_projector": Module(("multi_modal_projector.",)),
            vision_name: Module((prefix,), v_stack, (v_key,), v_pre)}


def _qwen_vl(new_layout: bool, text_keys: tuple[str, ...]) -> dict[str, Module]:
    """Qwen2-VL/2.5-VL (``model.layers``, ``visual.``) or Qwen3-VL (``model.language_model``, ``model.visual.``)."""
    if new_layout:
        text, visual = "model.language_model.", "model.visual."
        projector = Module((visual + "merger.", visual + "deepstack_merger_list."), visual + "deepstack_merger_list.",
                           pre=r"\.merger\.")
    else:
        text, visual = "model.", "visual."
        projector = Module((visual + "merger.",), pre=r"\.merger\.ln_q\.")
    return {"text_decoder": Module((text, "lm_head."), text + "layers.", text_keys),
            "multi_modal_projector": projector,
            "vision_tower": Module((visual,), visual + "blocks.", ("vision_config.depth",))}


#: mergekit 0.1.5's multi-module architectures (``config.json``'s ``architectures[0]``) -> modules.
ARCHITECTURES: dict[str, dict[str, Module]] = {
    "Qwen2VLForConditionalGeneration": _qwen_vl(False, ("num_hidden_layers", "text_config.num_hidden_layers")),
    "Qwen2_5_VLForConditionalGeneration": _qwen_vl(False, ("text_config.num_hidden_layers", "num_hidden_layers")),
    "Qwen3VLForConditionalGeneration": _qwen_vl(True, ("text_config.num_hidden_layers",)),
    "Qwen3VLMoeForConditionalGeneration": _qwen_vl(True, ("text_config.num_hidden_layers",)),
    "Gemma3ForConditionalGeneration": _vision_language(
        "language_model.", "language_model.model.layers.",
        ("vision_tower.vision_model.", "vision_tower.vision_model.encoder.layers.", "vision_config.num_hidden_layers",
         _EMBED)),
    "Llama4ForConditionalGeneration": _vision_language(
        "language_model.", "language_model.model.layers.",
        ("vision_model.", "vision_model.model.layers.", "vision_config.num_hidden_layers",
         r"class_embedding|patch_embedding|positional_embedding|layernorm_pre"), vision_name="vision_model"),
    "Mistral3ForConditionalGeneration": _vision_language(
        "language_model.", "language_model.model.layers.",
        ("vision_tower.", "vision_tower.transformer.layers.", "vision_config.num_hidden_layers",
         r"patch_conv|ln_pre")),
    "T5ForConditionalGeneration": {
        "encoder": Module(("encoder.",), "encoder.block.", ("num_layers", "num_hidden_layers")),
        "decoder": Module(("decoder.",), "decoder.block.", ("num_decoder_layers",)),
        "shared": Module(("shared.", "lm_head."), pre=r"^shared\."),
    },
    "WhisperForConditionalGeneration": {
        "encoder": Module(("model.encoder.",), "model.encoder.layers.", ("encoder_layers",),
                          r"embed_positions|\.conv[12]\."),
        "decoder": Module(("model.decoder.",), "model.decoder.layers.", ("decoder_layers",)),
    },
}


@dataclass(frozen=True)
class Naming:
    """One key layout of an architecture: its name, a pattern only its tensor names match (the
    marker) and its prefix renames from mergekit's names (``(mergekit's, this layout's)``)."""

    name: str
    marker: str
    renames: tuple[tuple[str, str], ...] = ()

    def from_mergekit(self, name: str) -> str:
        """A tensor name (or a prefix that ends at a dot) in this layout."""
        return _rename(name, self.renames)

    def to_mergekit(self, name: str) -> str:
        return _rename(name, tuple((new, old) for old, new in self.renames))

    def modules(self, modules: Mapping[str, Module]) -> dict[str, Module]:
        """mergekit's ``modules`` with their prefixes and stacks named in this layout."""
        if not self.renames:
            return dict(modules)
        return {name: Module(tuple(dict.fromkeys(p for prefix in spec.prefixes for p in self._prefixes(prefix))),
                             None if spec.stack is None else self.from_mergekit(spec.stack), spec.layers_keys, spec.pre)
                for name, spec in modules.items()}

    def _prefixes(self, prefix: str) -> list[str]:
        # a prefix that several renames split (mergekit's text decoder "language_model." holds both
        # "language_model.model." and "language_model.lm_head.") becomes each of their new prefixes
        inside = [new for old, new in self.renames if old.startswith(prefix) and old != prefix]
        return inside or [self.from_mergekit(prefix)]


def _rename(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``name`` with its longest matching ``old`` prefix replaced by ``new``."""
    best = max((r for r in renames if name.startswith(r[0])), key=lambda r: len(r[0]), default=None)
    return name if best is None else best[1] + name[len(best[0]):]


_TF5 = "transformers 5 (model.language_model.*)"
_LLAVA_TF5 = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("multi_modal_projector.", "model.multi_modal_projector."))
_QWEN2_VL = (Naming("mergekit's (model.layers.*, visual.*)", r"^(?:visual\.|model\.(?:layers|embed_tokens|norm)\.)"),
             Naming(_TF5, r"^model\.(?:language_model|visual)\.",
                    (("model.", "model.language_model."), ("visual.", "model.visual."))))

#: The key layouts of an architecture (``config.json``'s ``architectures[0]``), mergekit's first;
#: those of :data:`ARCHITECTURES` not listed have mergekit's alone.
NAMINGS: dict[str, tuple[Naming, ...]] = {
    "Gemma3ForConditionalGeneration": (
        Naming("mergekit's (language_model.model.*, vision_tower.vision_model.*)", r"^vision_tower\.vision_model\."),
        Naming(_TF5, r"^model\.(?:language_model|vision_tower|multi_modal_projector)\.",
               _LLAVA_TF5 + (("vision_tower.vision_model.", "model.vision_tower."),)),
        # transformers 5's default save_pretrained of a model it did not load: mergekit's names but
        # the vision tower's without vision_model. (the prefix it drops on load is not put back)
        Naming("transformers 5 save_pretrained (vision_tower.* without vision_model.)",
               r"^vision_tower\.(?!vision_model\.)", (("vision_tower.vision_model.", "vision_tower."),))),
    "Mistral3ForConditionalGeneration": (
        Naming("mergekit's (language_model.model.*, vision_tower.*)", r"^(?:language_model|vision_tower)\."),
        Naming(_TF5, r"^model\.(?:language_model|vision_tower|multi_modal_projector)\.",
               _LLAVA_TF5 + (("vision_tower.", "model.vision_tower."),))),
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN2_VL,
}


def _llava_namings(extra: tuple[tuple[str, str], ...] = (), towers: tuple[str, ...] = ("vision_tower",)
                   ) -> tuple[Naming, ...]:
    """The LLaVA family's layouts (modules inferred from the names: mergekit has no definition):
    its published checkpoints' (``language_model.model.*``, ``vision_tower.vision_model.*`` of a
    CLIP/SigLIP tower), transformers 5's in memory (its ``llava``/``llava_next``/``video_llava``
    conversion rules, the ``vision_model.`` its CLIP/SigLIP prefix change drops) and its default
    save of a model it built (published names, the towers' without ``vision_model.``; a tower
    that never had that prefix, InternVL's, is named so in every file layout but memory's)."""
    tops = "|".join(["language_model", *towers, "multi_modal_projector",
                     *(re.escape(new.removeprefix("model.")) for _, new in extra)])
    alt = "|".join(towers)
    return (Naming(f"published (language_model.model.*, {towers[0]}.vision_model.*)",
                   rf"^(?:{alt})\.vision_model\."),
            Naming(_TF5, rf"^model\.(?:{tops})\b",
                   _LLAVA_TF5 + tuple((f"{t}.vision_model.", f"model.{t}.") for t in towers) + extra),
            Naming(f"transformers 5 save_pretrained ({towers[0]}.* without vision_model.)",
                   rf"^(?:{alt})\.(?!vision_model\.)", tuple((f"{t}.vision_model.", f"{t}.") for t in towers)))


_LLAVA = _llava_namings()
_LLAVA_NEXT = _llava_namings((("image_newline", "model.image_newline"),))
#: The key layouts of architectures whose modules are inferred (mergekit 0.1.5 has no definition:
#: their module names are tensor-name prefixes), published checkpoints' first; a config's module
#: names may be written in any of them (:func:`module_names_in_layout`).
INFERRED_NAMINGS: dict[str, tuple[Naming, ...]] = {
    "LlavaForConditionalGeneration": _LLAVA,
    "VipLlavaForConditionalGeneration": _LLAVA,
    "PaliGemmaForConditionalGeneration": _LLAVA,
    "LlavaNextForConditionalGeneration": _LLAVA_NEXT,
    "LlavaNextVideoForConditionalGeneration": _LLAVA_NEXT,
    "LlavaOnevisionForConditionalGeneration": _LLAVA_NEXT,
    "AyaVisionForConditionalGeneration": _LLAVA,
    "InternVLForConditionalGeneration": _LLAVA,
    "VideoLlavaForConditionalGeneration": _llava_namings(towers=("image_tower", "video_tower")),
    # Mllama (Llama 3.2 Vision): published checkpoints' names are also transformers 5's default
    # save (its vision tower never had a vision_model.vision_model.); in memory, its mllama rules
    "MllamaForConditionalGeneration": (
        Naming("published (language_model.model.*, vision_model.*)", r"^(?:language_model|vision_model)\."),
        Naming(_TF5, r"^model\.(?:language_model|vision_model|multi_modal_projector)\.",
               _LLAVA_TF5 + (("vision_model.", "model.vision_model."),))),
}


def other_layout_of(name: str, names: Container[str]) -> tuple[Naming, Naming] | None:
    """For an architecture without layout tables: the LLaVA-style layouts ``(name's, names')``
    when ``name`` is missing from ``names`` but its rename into another such layout is there
    (a hint for a refusal), else None."""
    for own in _LLAVA:
        if not re.search(own.marker, name) and own is not _LLAVA[0]:
            continue
        for other in _LLAVA:
            if other is not own and other.from_mergekit(own.to_mergekit(name)) in names:
                return own, other
    return None


def memory_naming(arch: str | None) -> Naming | None:
    """transformers 5's in-memory layout of ``arch`` (the names PEFT gives an adapter's modules
    and matches ``target_modules`` against), or None where polytask knows no other layout."""
    return next((n for n in namings_of(arch) if n.name == _TF5), None)


def namings_of(arch: str | None) -> tuple[Naming, ...]:
    """The key layouts polytask knows for ``arch`` (:data:`NAMINGS`, :data:`INFERRED_NAMINGS`), or ()."""
    return NAMINGS.get(arch or "") or INFERRED_NAMINGS.get(arch or "", ())

_MERGEKIT = Naming("mergekit's", r"(?!)")


def naming_of(arch: str, names: Iterable[str], label: str = "the reference") -> Naming:
    """The key layout of a checkpoint of ``arch`` with tensors ``names``: the one whose marker
    some name matches (none: mergekit's); MergeError naming the model if two layouts' do."""
    namings = namings_of(arch) or (_MERGEKIT,)
    found: dict[Naming, str] = {}
    for name in names:
        for naming in namings:
            if naming not in found and re.search(naming.marker, name):
                found[naming] = name
    if len(found) > 1:
        (a, ea), (b, eb) = list(found.items())[:2]
        raise MergeError(f"model {label}: its tensors are named in two key layouts of {arch}: {a.name} ({ea!r}) and "
                         f"{b.name} ({eb!r}); save it again with one of them")
    return next(iter(found), namings[0])


class RenamedSource:
    """A checkpoint seen with its tensors renamed (another key layout); reads go to the old names."""

    def __init__(self, inner: Any, renamed: Mapping[str, str]) -> None:
        self.inner = inner
        self.label = getattr(inner, "label", "")
        self._new = dict(renamed)  # old -> new
        self._old = {new: old for old, new in self._new.items()}

    def names(self) -> list[str]:
        return [self._new[n] for n in self.inner.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._old

    def spec(self, name: str) -> Any:
        return self.inner.spec(self._old[name])

    def load(self, name: str) -> Any:
        return self.inner.load(self._old[name])

    def read_into(self, name: str, out: Any) -> None:
        self.inner.read_into(self._old[name], out)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> Any:
        return self.inner.view(self._old[name], rows)

    def __getattr__(self, attr: str) -> Any:
        if attr == "read_rows_into" and hasattr(self.inner, "read_rows_into"):  # only where the inner has it
            return lambda name, out, start, stop: self.inner.read_rows_into(self._old[name], out, start, stop)
        raise AttributeError(attr)


def same_naming(reference: str | Path | None, sources: Sequence[Any], labels: Sequence[str], ref: int) -> list[Any]:
    """``sources`` with those in another key layout than ``sources[ref]`` renamed to its layout
    (the architecture is the ``config.json`` of the folder ``reference``); the others as they are."""
    arch = architecture_name(reference)
    if not namings_of(arch):
        return list(sources)
    target = naming_of(arch, sources[ref].names(), labels[ref])
    out = list(sources)
    for i, s in enumerate(sources):
        own = naming_of(arch, s.names(), labels[i])
        if own == target:
            continue
        renamed = {n: target.from_mergekit(own.to_mergekit(n)) for n in s.names()}
        first: dict[str, str] = {}
        for old, new in renamed.items():
            if first.setdefault(new, old) != old:
                raise MergeError(f"model {labels[i]}: tensors {first[new]!r} and {old!r} ({own.name}) are both "
                                 f"named {new!r} in the layout of model {labels[ref]} ({target.name})")
        out[i] = RenamedSource(s, renamed)
    return out


def architecture_name(folder: str | Path | None) -> str | None:
    """The one architecture the ``config.json`` of ``folder`` names, or None (no readable config,
    none or several named)."""
    if folder is None:
        return None
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    names = cfg.get("architectures") if isinstance(cfg, dict) else None
    return names[0] if isinstance(names, list) and len(names) == 1 and isinstance(names[0], str) else None


def architecture_of(folder: str | Path | None) -> tuple[str, dict[str, Module]] | None:
    """The multi-module architecture of the model in ``folder`` (its ``config.json``), or None
    for a one-module model (or no readable config)."""
    arch = architecture_name(folder)
    return (arch, ARCHITECTURES[arch]) if arch in ARCHITECTURES else None


def module_names_in_layout(arch: str, modules: Mapping[str, Module], written: Iterable[str],
                           names: Iterable[str]) -> dict[str, str]:
    """The inferred modules' names (``modules``, named in the layout of tensors ``names``) that a
    config's module names ``written`` in another key layout of ``arch`` stand for
    (``language_model.model.layers`` is ``model.language_model.layers`` in transformers 5's);
    names already in ``modules``, or in no layout, are left out."""
    namings = namings_of(arch)
    if not namings:
        return {}
    target = naming_of(arch, names)
    found: dict[str, str] = {}
    for name in written:
        if name in modules:
            continue
        for naming in namings:
            renamed = target.from_mergekit(naming.to_mergekit(name + "."))[:-1]
            if renamed in modules:
                found[name] = renamed
                break
    return found


_FIRST_INDEX = re.compile(r"\.(\d+)\.")


def inferred_modules(names: Iterable[str]) -> dict[str, Module] | None:
    """mergekit's modules for a model it has no definition of (its ``infer_architecture_info``,
    LLaVA for one): one module per stack of numbered layers, named by the text before the first
    ``.<i>.`` of its tensors (``model.language_model.layers``), and ``default`` for the other
    tensors (all before the layers); None for a model with one stack (one module), or with
    numbered names that are not layers 0..N-1 (``nn.Sequential`` children skip their activations)."""
    names = list(names)
    numbers: dict[str, set[int]] = {}
    for n in names:
        if (m := _FIRST_INDEX.search(n)) is not None:
            numbers.setdefault(n[:m.start()], set()).add(int(m.group(1)))
    stacks = sorted(numbers)
    if len(stacks) < 2:
        return None
    if any(found != set(range(len(found))) for found in numbers.values()):
        return None  # not layer stacks (e.g. nn.Sequential indices 0, 2, 4): one module
    modules = {s: Module((s + ".",), s + ".") for s in stacks}
    if any(_FIRST_INDEX.search(n) is None for n in names):
        modules["default"] = Module(("",), pre="")
    return modules


def layout_of(folder: str | Path | None, names: Iterable[str],
              label: str = "the reference") -> tuple[str, dict[str, Module]] | None:
    """The modules of a model: mergekit's definition (:data:`ARCHITECTURES`) of its
    architecture named in the key layout of its tensor ``names`` (:func:`naming_of`), else
    inferred from ``names`` as mergekit infers them, else None (one module)."""
    names = list(names)
    known = architecture_of(folder)
    if known is not None:
        return known[0], naming_of(known[0], names, label).modules(known[1])
    if folder is None or not (Path(folder) / "config.json").is_file():
        return None  # not a transformers model (mergekit needs its config.json to infer anything)
    inferred = inferred_modules(names)
    if inferred is None:
        return None
    try:
        arch = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    except (OSError, TypeError, KeyError, IndexError, json.JSONDecodeError):
        arch = "the model"
    return str(arch), _with_count_keys(str(arch), inferred, names, label)


#: The ``config.json`` keys of the LLaVA family's inferred stacks (named in published checkpoints'
#: layout); mergekit 0.1.5 knows none, so a frankenmerge there leaves its config's count wrong.
_INFERRED_COUNT_KEYS = {"language_model.model.layers.": ("text_config.num_hidden_layers",),
                        "vision_tower.vision_model.encoder.layers.": ("vision_config.num_hidden_layers",),
                        "vision_model.transformer.layers.": ("vision_config.num_hidden_layers",),  # Mllama
                        "vision_model.global_transformer.layers.": ("vision_config.num_global_layers",)}


def _with_count_keys(arch: str, modules: dict[str, Module], names: list[str], label: str) -> dict[str, Module]:
    """``modules`` with the layer-count keys of the stacks polytask knows for ``arch`` set."""
    if arch not in INFERRED_NAMINGS:
        return modules
    naming = naming_of(arch, names, label)
    out = dict(modules)
    for name, spec in modules.items():
        keys = _INFERRED_COUNT_KEYS.get(INFERRED_NAMINGS[arch][0].from_mergekit(naming.to_mergekit(spec.stack or "")))
        if keys is not None:
            out[name] = Module(spec.prefixes, spec.stack, keys, spec.pre)
    return out


def module_of(name: str, modules: Mapping[str, Module]) -> str | None:
    """The module holding tensor ``name`` (its longest matching prefix), or None."""
    best, length = None, -1
    for module, spec in modules.items():
        for prefix in spec.prefixes:
            if name.startswith(prefix) and len(prefix) > length:
                best, length = module, len(prefix)
    return best


class _ModuleView:
    """One module's tensors of a checkpoint (names filtered; reads go to the checkpoint)."""

    def __init__(self, source: Any, names: list[str]) -> None:
        self._source = source
        self._names = names
        self._set = set(names)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._set

    def spec(self, name: str) -> Any:
        return self._source.spec(name)


@dataclass
class ModulePlans:
    """The jobs of every module and each planned module's number of output layers."""

    jobs: list[Any]
    num_layers: dict[str, int]
    layer_sources: dict[str, list[int]] = field(default_factory=dict)


def plan_modules(config: Any, arch: str, modules: Mapping[str, Module], sources: Sequence[Any],
                 source_of: Mapping[str, int], labels: Sequence[str]) -> ModulePlans:
    """Plan ``config`` (paths resolved) over the modules of architecture ``arch``: each module of
    ``config.modules`` (or every module, for top-level ``models:``) as its own merge of the
    module's tensors. ConfigError/MergeError naming the module for unknown modules, a module a
    model lacks, and everything :func:`plan_config` refuses."""
    from polytask.merge.plan import plan_config

    wanted = _module_configs(config, arch, modules)
    owner = [{n: module_of(n, modules) for n in s.names()} for s in sources]
    ref = source_of[config.base_model] if config.base_model is not None else source_of[config.model_paths()[0]]
    _warn_dropped(arch, owner[ref], wanted, labels[ref])
    every_name = {n for s in sources for n in s.names()}
    jobs: list[Any] = []
    layers: dict[str, int] = {}
    sources_of: dict[str, list[int]] = {}
    lengths: dict[str, list[int]] = {}
    for name, sub in wanted.items():
        spec = modules[name]
        views = [_ModuleView(s, [n for n, m in owner[i].items() if m == name]) for i, s in enumerate(sources)]
        for path in sub.model_paths():
            i = source_of[path]
            if not views[i].names():
                raise MergeError(f"modules.{name}: model {labels[i]} has no tensor of module {name} (names starting "
                                 f"{' or '.join(spec.prefixes)})")
        try:
            planned = plan_config(sub, views, source_of, labels, layer_stack=spec.stack, pre=re.compile(spec.pre),
                                  filter_names=every_name, check_gradient_fit=False)
        except PolytaskError as exc:
            raise type(exc)(f"modules.{name}: {exc}") from None
        jobs.extend(planned.jobs)
        layers[name] = planned.num_layers
        sources_of[name] = planned.layer_sources
        lengths[name] = planned.slice_lengths
        _warn_unknown_count(name, spec, views[ref], planned.num_layers)
    _check_gradient_fit(config, lengths)
    return ModulePlans(jobs, layers, sources_of)


def _warn_unknown_count(name: str, spec: Module, ref: _ModuleView, out_layers: int) -> None:
    """A module whose layer count no ``config.json`` key is known for (an inferred one) and whose
    output has another number of layers than the reference: the copied config is wrong there."""
    if spec.stack is None or spec.layers_keys:
        return
    pattern = re.compile(rf"^{re.escape(spec.stack)}(\d+)\.")
    had = len({m.group(1) for n in ref.names() if (m := pattern.match(n))})
    if had != out_layers:
        warnings.warn(f"modules.{name}: the output has {out_layers} layers where the reference has {had}; no "
                      "config.json key is known for this module's count (as in mergekit): correct the config",
                      RuntimeWarning, stacklevel=3)


def _check_gradient_fit(config: Any, lengths: Mapping[str, list[int]]) -> None:
    """Every gradient fits the layers of some slice it applies to: a top-level one those of any
    module (a projector of 3 layers does not refuse a gradient over 36 text layers), a module's
    those of its slices, a slice's its own."""
    from polytask.merge.plan import gradient_lengths

    def check(where: str, scope: Mapping[str, Any], sizes: Mapping[str, int]) -> None:
        most = max(sizes.values(), default=0)
        for w, n in gradient_lengths(where, scope):
            if n > max(most, 1):
                shown = ", ".join(f"{k}: {v}" for k, v in sizes.items())
                raise ConfigError(f"{w}: a gradient of {n} values does not fit the layers it applies to ({shown}); "
                                  f"give at most {max(most, 1)} values, got {n}")

    every = {f"modules.{m}": max(ls, default=0) for m, ls in lengths.items()}
    check("parameters", config.parameters, every)
    for k, e in enumerate(config.models or []):
        check(f"models[{k}].parameters", e.parameters, every)
    for m, module in (config.modules or {}).items():
        own = {f"modules.{m}": every[f"modules.{m}"]}
        check(f"modules.{m}.parameters", module.parameters, own)
        for k, e in enumerate(module.models or []):
            check(f"modules.{m}.models[{k}].parameters", e.parameters, own)
        for i, sl in enumerate(module.slices or []):
            where = f"modules.{m}.slices[{i}]"
            check(f"{where}.parameters", sl.parameters, {where: lengths[m][i]})
            for k, src in enumerate(sl.sources):
                check(f"{where}.sources[{k}].parameters", src.parameters, {where: lengths[m][i]})


def _module_configs(config: Any, arch: str, modules: Mapping[str, Module]) -> dict[str, Any]:
    """Each planned module's config in the one-module form (models/slices, parameters merged)."""
    have = ", ".join(sorted(modules))
    if config.slices is not None:
        raise ConfigError(f"slices: {arch} has several modules ({have}); give the slices of each under "
                          "modules: {<module>: {slices: ...}} (mergekit refuses top-level slices here too)")
    if config.modules is None:
        return {name: config for name in modules}
    unknown = [name for name in config.modules if name not in modules]
    if unknown:
        raise ConfigError(f"modules.{unknown[0]}: {arch} has no module {unknown[0]!r}; its modules are {have}")
    return {name: config.module_config(name) for name in config.modules}


def _warn_dropped(arch: str, owner: Mapping[str, str | None], wanted: Mapping[str, Any], label: str) -> None:
    outside = sorted(n for n, m in owner.items() if m is None)
    if outside:
        warnings.warn(f"{len(outside)} tensor(s) of model {label} belong to no module of {arch} and are not "
                      f"written (as in mergekit), e.g. {outside[0]!r}", RuntimeWarning, stacklevel=3)
    left_out = sorted({m for m in owner.values() if m is not None} - set(wanted))
    if left_out:
        warnings.warn(f"modules: {', '.join(left_out)} of {arch} not listed; the output has no tensor of "
                      f"{'it' if len(left_out) == 1 else 'them'} (as in mergekit)", RuntimeWarning, stacklevel=3)


def modules_output_config(reference: str | Path | None, num_layers: Mapping[str, int], modules: Mapping[str, Module],
                          dtype: Any, layer_sources: Mapping[str, Sequence[int]] | None = None) -> str | None:
    """The reference's ``config.json`` with each planned module's number of layers set (at
    each of its keys that the file has) and the ``layer_types`` beside it following the output's
    layers (``layer_sources``: :func:`~polytask.merge.plan.set_layer_count`), or None if there is
    no such file or nothing changes."""
    from polytask.merge.plan import set_layer_count

    if reference is None:
        return None
    try:
        cfg = json.loads((Path(reference) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict):
        return None
    changed = False
    for name, count in num_layers.items():
        for key in modules[name].layers_keys:
            *parents, leaf = key.split(".")
            node: Any = cfg
            for p in parents:
                node = node.get(p) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf in node:
                changed |= set_layer_count(node, leaf, count, (layer_sources or {}).get(name))
    if not changed:
        return None
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        if "dtype" in cfg:
            cfg["dtype"] = cfg["torch_dtype"]
    return json.dumps(cfg, indent=2) + "\n"
