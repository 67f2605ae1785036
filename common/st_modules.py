"""A model folder as sentence-transformers reads it: the modules of each half, and the one module it lacks.

`Encoder.save_pretrained` calls `save_sentence_transformers`. A `cls` / `mean` folder is one
`SentenceTransformer`; a `dupmae` folder holds both halves of the representation (RepresentationConfig's fields):

    OUT/                                 the HF model (MLM head included), tokenizer, representation.json, projection
        modules.json                     SentenceTransformer(OUT): the dense half
            Transformer -> 1_Pooling (cls | mean) -> 2_Dense (the projection W, identity activation)
                        -> 3_Normalize (if normalize)
        config_sentence_transformers.json    similarity "dot" (every kind): the dense score is a dot product; without
                                         it sentence-transformers would score an unnormalized model by cosine
        sentence_bert_config.json
        sparse/                          SparseEncoder(OUT/sparse, trust_remote_code=True): the sparse half
            modules.json                 Transformer (fill-mask: MLM logits) -> 1_DupMAESparsePooling
            config_sentence_transformers.json    model_type SparseEncoder, similarity "dot"
            sentence_bert_config.json    transformer_task fill-mask
            1_DupMAESparsePooling/config.json    top_k, sparse_bias, sparse_values, normalize
            config.json, model.safetensors, tokenizer files, ...    links to OUT's files (one copy of the weights)

Why two folders: each loader reads modules.json and config_sentence_transformers.json's model_type from the folder
it is given, and turns a folder of the other type into another model: SentenceTransformer builds Transformer + mean
pooling on a SparseEncoder folder, SparseEncoder appends an untrained SparseAutoEncoder to a SentenceTransformer
folder (sentence-transformers 6.2, `BaseModel._load_modules`). Why a module of ours: SpladePooling pools
log(1 + relu(logit)) over every attended token, DupMAE's μ is the raw logit's max over ordinary tokens (optionally
without the head's bias), and only documents keep their top-k. Why `trust_remote_code=True`: sentence-transformers
>= 6.0 asks for it for every module class outside its own package, installed ones included; the class is imported
from this installed package and the folder holds no code.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from sentence_transformers.base.modules import Module
from torch import Tensor

from common.sparse import ordinary_tokens, sparse_half, sparsify

logger = logging.getLogger(__name__)

SPARSE_DIR = "sparse"
#: The files a folder's sentence-transformers modules are described by; sparse/ has its own, it links the rest.
ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


class DupMAESparsePooling(Module):
    """MLM logits [B, L, V] -> DupMAE's vocabulary vector μ [B, V], as `Encoder` computes it.

    μ = max over ordinary tokens (attended, minus [CLS] and each row's last attended token [SEP]) of the logits, minus
    the head's output bias when `sparse_bias` is False, then `sparse_half` (softmax for `sparse_values` "probs",
    L2-normalized with `normalize`); a text without ordinary tokens gets a zero vector. Queries
    (`encode_query`, task "query") keep the whole vector, as the score reads it at each document's kept entries;
    documents and plain `encode` keep their `top_k` largest entries. Inputs must be padded (unpad_inputs false).
    """

    config_keys = ["top_k", "sparse_bias", "sparse_values", "normalize"]
    forward_kwargs = {"task"}

    def __init__(self, top_k: int, sparse_bias: bool = True, sparse_values: str = "logits", normalize: bool = False):
        super().__init__()
        self.top_k, self.sparse_bias, self.sparse_values, self.normalize = top_k, sparse_bias, sparse_values, normalize
        self.vocab_size: int | None = None  # known once the model is built
        self.register_parameter("output_bias", None)  # sparse_bias False: the head's bias, tied (`on_model_ready`)

    def on_model_ready(self, model) -> None:
        head = model.transformers_model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0]
        if not self.sparse_bias:
            self.output_bias = head.bias  # the same Parameter: follows the model's device, dtype and training

    def forward(self, features: dict[str, Tensor], task: str | None = None) -> dict[str, Tensor]:
        logits = features["token_embeddings"]  # [B, L, V]
        keep = ordinary_tokens(features["attention_mask"])  # [B, L]
        # In place: the logits are the forward's largest tensor, nothing reads them later and their producer (the
        # head's Linear) does not keep them for backward.
        pooled = logits.masked_fill_(~keep[:, :, None], float("-inf")).amax(1)  # [B, V]
        if self.output_bias is not None:
            pooled = pooled - self.output_bias
        pooled = sparse_half(pooled, features["attention_mask"], self.sparse_values, self.normalize)
        if task != "query":
            indices, values = sparsify(pooled, self.top_k)
            pooled = torch.zeros_like(pooled).scatter(-1, indices, values)  # [B, V], top_k entries kept
        features["sentence_embedding"] = pooled
        return features

    def get_embedding_dimension(self) -> int | None:
        return self.vocab_size

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)


def save_sentence_transformers(encoder, out: Path, tokenizer) -> None:
    """The sentence-transformers files of `encoder` (a saved `Encoder`) in `out`: see the module docstring."""
    config, hidden = encoder.config, encoder.model.config.hidden_size
    max_len = encoder.max_seq_length or min(getattr(tokenizer, "model_max_length", 512) or 512,
                                            encoder.model.config.max_position_embeddings)
    modules = [("sentence_transformers.models.Transformer", "")]
    modules.append(("sentence_transformers.models.Pooling", "1_Pooling"))
    pooling = {  # the legacy keys: read by sentence-transformers 3 to 6
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": config.pooling == "cls",
        "pooling_mode_mean_tokens": config.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    _write_json(out / "1_Pooling" / "config.json", pooling)
    if config.kind == "dupmae":
        modules.append(("sentence_transformers.models.Dense", "2_Dense"))
        _save_dense(encoder.projection, out / "2_Dense")
    if config.normalize:
        modules.append(("sentence_transformers.models.Normalize", f"{len(modules)}_Normalize"))
        (out / modules[-1][1]).mkdir(exist_ok=True)
    _write_modules(out, modules)
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": int(max_len), "do_lower_case": False})
    # Every kind: our score is the dot product of these vectors (normalized by 3_Normalize when `normalize`), and
    # sentence-transformers would score a folder that names no similarity by cosine.
    _write_json(out / "config_sentence_transformers.json",
                {"model_type": "SentenceTransformer", "similarity_fn_name": "dot"})
    if config.kind == "dupmae":
        _save_sparse(out, DupMAESparsePooling(config.top_k, config.sparse_bias, config.sparse_values, config.normalize),
                     int(max_len))


def _save_dense(projection: torch.nn.Linear, folder: Path) -> None:
    """The projection W as a sentence-transformers Dense module with the identity activation."""
    from safetensors.torch import save_file

    out_features, in_features = projection.weight.shape
    _write_json(folder / "config.json", {"in_features": in_features, "out_features": out_features, "bias": True,
                                         "activation_function": "torch.nn.modules.linear.Identity"})
    save_file({"linear.weight": projection.weight.detach().contiguous().cpu(),
               "linear.bias": projection.bias.detach().contiguous().cpu()}, str(folder / "model.safetensors"))


def _save_sparse(out: Path, pooling: DupMAESparsePooling, max_len: int) -> None:
    """out/sparse: a SparseEncoder folder whose Transformer reads out's model and tokenizer files through links."""
    sparse = out / SPARSE_DIR
    sparse.mkdir(exist_ok=True)
    for source in sorted(out.iterdir()):
        if source.is_file() and source.name not in ST_FILES:
            _link(source, sparse / source.name)
    pooling_dir = f"1_{type(pooling).__name__}"
    _write_modules(sparse, [("sentence_transformers.base.modules.transformer.Transformer", ""),
                            (f"{type(pooling).__module__}.{type(pooling).__name__}", pooling_dir)])
    (sparse / pooling_dir).mkdir(exist_ok=True)
    pooling.save(str(sparse / pooling_dir))
    _write_json(sparse / "sentence_bert_config.json", {"max_seq_length": max_len, "do_lower_case": False,
                                                       "transformer_task": "fill-mask", "unpad_inputs": False})
    _write_json(sparse / "config_sentence_transformers.json",
                {"model_type": "SparseEncoder", "similarity_fn_name": "dot"})


def _link(source: Path, link: Path) -> None:
    """A relative link (the folder can move as a whole), or a copy where the filesystem has no links."""
    link.unlink(missing_ok=True)
    try:
        link.symlink_to(Path("..") / source.name)
    except OSError as exc:
        logger.warning("cannot link %s (%s): copying it", link, exc)
        shutil.copyfile(source, link)


def _write_modules(folder: Path, modules: list[tuple[str, str]]) -> None:
    rows = [{"idx": i, "name": str(i), "path": path, "type": type_} for i, (type_, path) in enumerate(modules)]
    _write_json(folder / "modules.json", rows)


def _write_json(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")
