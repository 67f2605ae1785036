"""One encoder for fine-tuning and evaluation: `cls` / `mean` pooling, or DupMAE's dense + sparse representation.

DupMAE (see ../shared/DUPMAE.md) represents a text by two parts:
  dense  ĥ = W_cls h_CLS                    [B, dense_dim]
  vocab  μ = max over ordinary tokens of MLMHead(h_i)   [B, V]   (not [CLS]/[SEP]/padding; inputs are [CLS] x [SEP])
and scores  <q, d> = ĥ_q·ĥ_d + Σ_{i ∈ top-k(μ_d)} μ_q[i] μ_d[i]  (only the document side is sparsified).

`cls` / `mean` folders are saved with a sentence-transformers `modules.json`, so `SentenceTransformer(path)`
gives the same embeddings; any folder with `representation.json` reloads with the config it was saved with.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.defaults import resolve_model

logger = logging.getLogger(__name__)

CONFIG_NAME = "representation.json"
PROJECTION_NAME = "projection.safetensors"
KINDS = ("cls", "mean", "dupmae")
#: Seed for weights a checkpoint lacks (MLM head, projection), so two loads of one folder encode identically.
INIT_SEED = 0
#: Tokens per MLM-head chunk: the [tokens, V] logits are never materialized for a whole batch at once.
HEAD_CHUNK_TOKENS = 2048


@dataclass
class RepresentationConfig:
    """How token states become a text representation."""

    kind: Literal["cls", "mean", "dupmae"] = "cls"  # cls / mean pooling (dense) or DupMAE dense + sparse
    normalize: bool = False  # L2-normalize the dense part (cosine similarity)
    dense_dim: int = 384  # dupmae: output dim of the [CLS] projection W_cls
    top_k: int = 384  # dupmae: vocabulary entries a document keeps (the query keeps all)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"RepresentationConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.dense_dim <= 0:
            raise ValueError(f"RepresentationConfig.dense_dim must be positive, got {self.dense_dim}")
        if self.top_k <= 0:
            raise ValueError(f"RepresentationConfig.top_k must be positive, got {self.top_k}")

    @classmethod
    def from_file(cls, path: str | Path) -> "RepresentationConfig":
        raw = json.loads(Path(path).read_text())
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}")
        return cls(**raw)


@dataclass
class Representation:
    """Encoder output. `vocab` is the full max-pooled MLM vector (dupmae only); `score` sparsifies it."""

    dense: Tensor  # [B, D]
    vocab: Tensor | None = None  # [B, V]


def sparsify(vocab: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row: (indices [B, k], values [B, k]); k is capped at V."""
    values, indices = torch.topk(vocab, min(k, vocab.shape[-1]), dim=-1)
    return indices, values


def score(queries: Representation, docs: Representation, top_k: int | None) -> Tensor:
    """[Bq, Bd] scores: dense dot plus the query's full vocab vector at each document's top-k entries.

    top_k=None keeps the whole document vector. Differentiable through both parts (training uses it).
    """
    scores = queries.dense @ docs.dense.T  # [Bq, Bd]
    if docs.vocab is None or queries.vocab is None:
        if docs.vocab is not None or queries.vocab is not None:
            raise ValueError("score: queries and documents must both have a vocab part, or neither")
        return scores
    doc_vocab = docs.vocab  # [Bd, V]
    if top_k is not None:
        indices, values = sparsify(doc_vocab, top_k)
        doc_vocab = torch.zeros_like(doc_vocab).scatter(-1, indices, values)  # zero outside the kept set
    return scores + queries.vocab @ doc_vocab.T


def _mlm_head(model: nn.Module) -> nn.Module:
    """The MLM head of an *ForMaskedLM model: its one child besides the base model (BERT `cls`, RoBERTa `lm_head`)."""
    heads = [m for name, m in model.named_children() if name != model.base_model_prefix]
    if len(heads) != 1:
        raise ValueError(f"{type(model).__name__}: expected one MLM head module beside the encoder, got {len(heads)}")
    return heads[0]


def _sentence_transformers_config(folder: Path) -> RepresentationConfig | None:
    """Pooling and normalization of a sentence-transformers folder (modules.json), or None if it is not one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = next((m for m in modules if m["type"].endswith("Pooling")), None)
    if pooling is None:
        raise ValueError(f"{modules_file}: no Pooling module; only cls/mean pooled models are supported")
    raw = json.loads((folder / pooling["path"] / "config.json").read_text())
    mode = raw.get("pooling_mode") or (
        "cls" if raw.get("pooling_mode_cls_token") else "mean" if raw.get("pooling_mode_mean_tokens") else None
    )
    if mode not in ("cls", "mean"):
        raise ValueError(f"{folder / pooling['path']}/config.json: pooling {mode or raw} is not supported (cls or mean)")
    unsupported = [t for t in types if t not in ("Transformer", "Pooling", "Normalize")]
    if unsupported:
        raise ValueError(f"{modules_file}: modules {unsupported} are not supported (Transformer, Pooling, Normalize)")
    return RepresentationConfig(kind=mode, normalize="Normalize" in types)


def saved_config(name_or_path: str | None) -> RepresentationConfig:
    """A model folder's own config: representation.json, else its sentence-transformers modules, else defaults."""
    folder = Path(resolve_model(name_or_path))
    if (folder / CONFIG_NAME).is_file():
        return RepresentationConfig.from_file(folder / CONFIG_NAME)
    return _sentence_transformers_config(folder) or RepresentationConfig()


class Encoder(nn.Module):
    """A HF encoder plus the pooling (and, for dupmae, the MLM head and [CLS] projection) that make a vector."""

    def __init__(self, model: nn.Module, config: RepresentationConfig, projection: nn.Linear | None = None):
        super().__init__()
        self.config = config
        self.model = model  # AutoModel (cls/mean) or AutoModelForMaskedLM (dupmae)
        self.projection = projection  # dupmae only: W_cls
        self.max_seq_length: int | None = None  # from sentence_bert_config.json when the folder has one

    @classmethod
    def from_pretrained(cls, name_or_path: str | None, config: RepresentationConfig | None = None) -> "Encoder":
        """Load a HF / sentence-transformers / DupMAE folder (None or "default": the packaged MiniLM)."""
        from transformers import AutoModel, AutoModelForMaskedLM

        path = resolve_model(name_or_path)
        folder = Path(path)
        config = config or saved_config(path)  # an explicit config wins over the folder's
        # Weights missing from the checkpoint are initialized from a fixed seed without touching the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            if config.kind == "dupmae":
                model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
                head_missing = [k for k in info["missing_keys"] if not k.startswith(model.base_model_prefix + ".")]
                if head_missing:
                    logger.warning("%s has no trained MLM head (%d tensors initialized): the sparse part is untrained",
                                   path, len(head_missing))
                projection = nn.Linear(model.config.hidden_size, config.dense_dim)
                projection_file = folder / PROJECTION_NAME
                if projection_file.is_file():
                    from safetensors.torch import load_file

                    projection.load_state_dict(load_file(str(projection_file)))
                else:
                    _init_projection(projection)
                    logger.warning("%s has no %s: [CLS] projection initialized (seed %d)", path, PROJECTION_NAME,
                                   INIT_SEED)
            else:
                model, projection = AutoModel.from_pretrained(path), None
        encoder = cls(model, config, projection)
        st_config = folder / "sentence_bert_config.json"
        if st_config.is_file():
            encoder.max_seq_length = json.loads(st_config.read_text()).get("max_seq_length")
        return encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Representation:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.config.kind != "dupmae":
            hidden = self.model(**inputs).last_hidden_state  # [B, L, H]
            if self.config.kind == "cls":
                dense = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
                dense = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return Representation(self._maybe_normalize(dense))
        hidden = getattr(self.model, self.model.base_model_prefix)(**inputs).last_hidden_state  # [B, L, H]
        dense = self._maybe_normalize(self.projection(hidden[:, 0]))
        return Representation(dense, self._max_pooled_vocab(hidden, attention_mask))

    def _maybe_normalize(self, dense: Tensor) -> Tensor:
        return F.normalize(dense, dim=-1) if self.config.normalize else dense

    def _max_pooled_vocab(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """μ = max over ordinary tokens of MLMHead(h_i) [B, V], computed in token chunks to bound memory."""
        head = _mlm_head(self.model)
        # Ordinary tokens: attended, minus position 0 ([CLS]) and each row's last attended position ([SEP]).
        ordinary = attention_mask.bool().clone()  # [B, L]
        last = attention_mask.sum(1).long() - 1  # [B]
        ordinary[torch.arange(len(last), device=last.device), last.clamp(min=0)] = False
        ordinary[:, 0] = False
        batch, length = attention_mask.shape
        chunk = max(1, HEAD_CHUNK_TOKENS // batch)
        pooled = None
        for start in range(0, length, chunk):
            logits = head(hidden[:, start:start + chunk])  # [B, c, V]
            keep = ordinary[:, start:start + chunk].unsqueeze(-1)  # [B, c, 1]
            part = logits.masked_fill(~keep, float("-inf")).amax(1)  # [B, V]
            pooled = part if pooled is None else torch.maximum(pooled, part)
        # A text with no ordinary token (empty string) has an all -inf max: it gets a zero vector instead.
        return pooled.masked_fill(~ordinary.any(1, keepdim=True), 0.0)

    def save_pretrained(self, out_dir: str | Path, tokenizer=None) -> None:
        """HF model (+ tokenizer), representation.json, the projection (dupmae) or sentence-transformers modules."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        (out / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        if self.config.kind == "dupmae":
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in self.projection.state_dict().items()},
                      str(out / PROJECTION_NAME))
            return
        self._save_sentence_transformers(out, tokenizer)

    def _save_sentence_transformers(self, out: Path, tokenizer) -> None:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.config.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (out / "2_Normalize").mkdir(exist_ok=True)
        (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        (out / "1_Pooling").mkdir(exist_ok=True)
        pooling = {  # the legacy keys: read by sentence-transformers 3 to 6
            "word_embedding_dimension": self.model.config.hidden_size,
            "pooling_mode_cls_token": self.config.kind == "cls",
            "pooling_mode_mean_tokens": self.config.kind == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
        (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
        max_len = self.max_seq_length or min(getattr(tokenizer, "model_max_length", 512) or 512,
                                             self.model.config.max_position_embeddings)
        (out / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": int(max_len), "do_lower_case": False}, indent=2) + "\n")


def _init_projection(projection: nn.Linear) -> None:
    """Identity when the shapes allow (zero-shot dense = [CLS]), else a Gaussian that preserves dot products on average."""
    with torch.no_grad():
        projection.bias.zero_()
        out_dim, in_dim = projection.weight.shape
        if out_dim == in_dim:
            projection.weight.copy_(torch.eye(out_dim))
        else:
            projection.weight.normal_(0.0, out_dim ** -0.5)
