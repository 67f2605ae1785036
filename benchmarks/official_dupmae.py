"""The pretrain_step baseline: staoxiao/RetroMAE's own DupMAEForPretraining, loaded from a local copy.

    --official_src DIR   a folder holding the official `pretrain` package (RetroMAE's `src/`) or that package
                         itself (`src/pretrain/`): modeling_duplex.py, enhancedDecoder.py, arguments.py

It runs in a separate Python (`benchmarks/pretrain_step.py --official_python`), one with the transformers
the code was written for (4.x; 4.46.3 was used): transformers 5 no longer has the imports it needs. This
module imports only torch and that package, and must not be imported next to our `pretrain` package (same
name). The official code is not part of this repository.

`benchmarks/official_parity.py` also loads the official RetroMAEForPretraining (modeling.py) and maps our
weights onto both (`official_name`, `DECODER_TO_OFFICIAL`). Two adaptations, neither touching what is computed
or kept for backward:
- modeling_duplex.py's forward calls `self.sparse_embedding`, a method the published file defines under the
  name `ot_embedding`; the class gets the alias when it lacks the name.
- Our collator's batch is converted to the official one: keys renamed, the [B, L, L] decoder mask as int64
  (1 = visible, as `1 - tensor(...)` makes it there), and the BoW target as the dense [B, V] float
  `bag_word_weight` the official collator builds.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor, nn


#: The official model classes and the modules that define them.
OFFICIAL_MODELS = {"DupMAEForPretraining": "modeling_duplex", "RetroMAEForPretraining": "modeling"}

#: Our `pretrain.enhanced_decoder.EnhancedDecoderLayer` submodules -> the official `BertLayerForDecoder`'s
#: (`c_head`); `.weight`/`.bias` follow. The encoder and MLM head need no table: ours `mlm.X` is theirs `lm.X`.
DECODER_TO_OFFICIAL = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attention_output": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense", "output": "output.dense", "output_norm": "output.LayerNorm",
}


def official_name(ours: str) -> str:
    """A parameter name of our DupMAEModel -> the official model's name for the same tensor."""
    if ours.startswith("mlm."):
        return "lm." + ours[len("mlm."):]
    if ours.startswith("decoder."):
        module, leaf = ours[len("decoder."):].rsplit(".", 1)
        return f"c_head.{DECODER_TO_OFFICIAL[module]}.{leaf}"
    raise KeyError(f"{ours}: no counterpart in the official model")


def import_official(src: str, module: str) -> ModuleType:
    """`pretrain.<module>` of the official package under src (RetroMAE's `src/` or `src/pretrain/`)."""
    folder = Path(src).resolve()
    if (folder / "modeling_duplex.py").is_file():  # the package folder itself
        folder, package = folder.parent, folder.name
    else:
        package = "pretrain"
    if not (folder / package / "modeling_duplex.py").is_file():
        raise SystemExit(f"--official_src {src}: no modeling_duplex.py there or in its pretrain/ folder")
    if package not in sys.modules:
        _register_package(package, folder / package)
    elif Path(getattr(sys.modules[package], "__path__", [""])[0]) != folder / package:
        # ours, most likely: both are called `pretrain`
        raise SystemExit(f"a '{package}' package is already imported ({sys.modules[package]}): load the official "
                         "code in a fresh process")
    return importlib.import_module(f"{package}.{module}")


def load_official(src: str, model_path: str, bow_loss_weight: float,
                  model_class: str = "DupMAEForPretraining") -> nn.Module:
    """<model_class>.from_pretrained(model_path) from the official package under src."""
    official = getattr(import_official(src, OFFICIAL_MODELS[model_class]), model_class)
    if model_class == "DupMAEForPretraining" and not hasattr(official, "sparse_embedding"):
        official.sparse_embedding = official.ot_embedding
    return official.from_pretrained(SimpleNamespace(bow_loss_weight=bow_loss_weight), model_path)


def dense_bow_target(bow_ids: Tensor, bow_weights: Tensor, vocab_size: int) -> Tensor:
    """bow_ids [B, T] (padded), bow_weights [B, T] (0 on padding) -> the official [B, V] float target."""
    return torch.zeros(len(bow_ids), vocab_size, device=bow_ids.device).scatter_(1, bow_ids.long(),
                                                                                  bow_weights.float())


def _register_package(name: str, path: Path) -> None:
    """Bind the package `name` to path (its __init__.py run if it has one), ahead of anything on sys.path.

    Put on sys.path instead, a folder without __init__.py would be a namespace package, which loses to our
    regular `pretrain` package on the same path.
    """
    init = path / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(path)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module


def official_batch(batch: dict[str, Tensor], vocab_size: int, bow_target: str = "ours") -> dict[str, Tensor]:
    """Our collator's batch (pretrain.collator.DupMAECollator) as the official collator's keyword arguments.

    bow_target: "ours" (the shards' weights), "official" (the official collator's 1/n per unique token, n the
    block's length without specials) or "none" (RetroMAEForPretraining takes no BoW target).
    """
    converted = {"encoder_input_ids": batch["input_ids"], "encoder_attention_mask": batch["attention_mask"],
                 "encoder_labels": batch["labels"], "decoder_input_ids": batch["decoder_input_ids"],
                 "decoder_attention_mask": batch["decoder_attention_mask"].long(),  # [B, L, L]
                 "decoder_labels": batch["decoder_labels"]}
    if bow_target != "none":
        weights = batch["bow_weights"]
        if bow_target == "official":  # weight[t] = 1 / len(tokens), assigned per unique t
            lengths = (batch["decoder_labels"] != -100).sum(1, keepdim=True).clamp(min=1)
            weights = (weights > 0).float() / lengths.float()
        converted["bag_word_weight"] = dense_bow_target(batch["bow_ids"], weights, vocab_size)
    return converted
