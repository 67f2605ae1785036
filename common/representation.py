"""One encoder for fine-tuning and evaluation: `cls` / `mean` pooling, or DupMAE's dense + sparse representation.

DupMAE (see ../shared/DUPMAE.md) represents a text by two parts:
  dense  ĥ = W pool(h)                      [B, dense_dim]   (paper: pool = [CLS]; `pooling` = mean is the choice
                                                              for sentence-transformers models trained with it)
  vocab  μ = max over ordinary tokens of MLMHead(h_i)   [B, V]   (not [CLS]/[SEP]/padding; inputs are [CLS] x [SEP])
and scores  <q, d> = ĥ_q·ĥ_d + w_s Σ_{i ∈ top-k(μ_d)} μ_q[i] μ_d[i]  (only the document side is sparsified;
w_s = `sparse_weight`, 1 in the paper). The paper's settings are the defaults. Three options make the
representation work before any fine-tuning, for a sentence embedder adapted by continued pre-training
(`dupmae_config` picks them; docs/adapting.md gives the measurements that chose them):
- W starts as the identity when dense_dim equals the hidden size, so the dense half is the base model's own
  pooled embedding;
- `sparse_bias` = False drops the MLM head's output bias from μ: continued pre-training starts that bias at the
  corpus's log unigram frequencies, so it holds the prior, and what is left scores a token by the text's evidence;
- `sparse_values` = "probs" scores softmax(μ), the bag-of-words distribution the OT loss trains: under that loss
  the logits are defined only up to a per-text constant, which a dot product of raw logits does not ignore;
- `normalize` L2-normalizes both halves, so the score is cos(dense) + w_s cos(sparse), on one scale.

Saved folders load in sentence-transformers with the same vectors (`common.st_modules`): `SentenceTransformer(path)`
gives the dense part of every kind, `SparseEncoder(path/sparse)` dupmae's vocabulary part; any folder with
`representation.json` reloads here with the config it was saved with.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.defaults import resolve_model
from common.model_loading import load_pretrained
from common.sparse import ordinary_tokens, sparse_half, sparsify
from common.vocab_pooling import split_mlm_head, vocab_max_pool

logger = logging.getLogger(__name__)

CONFIG_NAME = "representation.json"
PROJECTION_NAME = "projection.safetensors"
KINDS = ("cls", "mean", "dupmae")
POOLINGS = ("cls", "mean")
SPARSE_VALUES = ("logits", "probs")
#: Seed for weights a checkpoint lacks (MLM head, projection), so two loads of one folder encode identically.
INIT_SEED = 0
#: Vocabulary rows of the MLM head scored at once by the max-pool (`vocab_max_pool`).
VOCAB_CHUNK = 4096


@dataclass
class RepresentationConfig:
    """How token states become a text representation."""

    kind: Literal["cls", "mean", "dupmae"] = "cls"  # cls / mean pooling (dense) or DupMAE dense + sparse
    normalize: bool = False  # L2-normalize the dense part, for dupmae the sparse part too (cosine scores)
    dense_dim: int = 384  # dupmae: output dim of the projection W
    top_k: int = 384  # dupmae: vocabulary entries a document keeps (the query keeps all)
    pooling: Literal["cls", "mean"] = "cls"  # token states the dense part pools (cls/mean kinds: the kind itself)
    sparse_weight: float = 1.0  # dupmae: weight of the sparse dot product in the score (paper: 1)
    sparse_bias: bool = True  # dupmae: μ includes the MLM head's output bias (paper); False: bias-free evidence
    sparse_values: Literal["logits", "probs"] = "logits"  # dupmae: μ as is (paper), or softmax(μ)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"RepresentationConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "dupmae":
            self.pooling = self.kind
        if self.pooling not in POOLINGS:
            raise ValueError(f"RepresentationConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.sparse_weight < 0:
            raise ValueError(f"RepresentationConfig.sparse_weight must be >= 0, got {self.sparse_weight}")
        if self.sparse_values not in SPARSE_VALUES:
            raise ValueError(f"RepresentationConfig.sparse_values must be one of {SPARSE_VALUES}, got "
                             f"{self.sparse_values!r}")
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


def score(queries: Representation, docs: Representation, top_k: int | None, sparse_weight: float = 1.0) -> Tensor:
    """[Bq, Bd] scores: dense dot plus sparse_weight x the query's full vocab vector at each document's top-k entries.

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
    return scores + sparse_weight * (queries.vocab @ doc_vocab.T)


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """[B, L, H] token states -> [B, H]: the [CLS] state, or the mean over attended tokens (sentence-transformers')."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


#: The similarity sentence-transformers gives a SentenceTransformer whose config_sentence_transformers.json names
#: none (`SentenceTransformer.similarity_fn_name`, sentence-transformers 3 to 6): cosine. BEIR and MTEB score so too.
ST_DEFAULT_SIMILARITY = "cosine"


def _st_similarity(folder: Path) -> tuple[str, str]:
    """(similarity, where it comes from) of a sentence-transformers folder: its `similarity_fn_name`, else the
    default."""
    file = folder / "config_sentence_transformers.json"
    name = json.loads(file.read_text()).get("similarity_fn_name") if file.is_file() else None
    if name is None:
        return ST_DEFAULT_SIMILARITY, f"{file} names no similarity_fn_name: sentence-transformers' default"
    return name, f"similarity_fn_name in {file}"


def _sentence_transformers_config(folder: Path) -> RepresentationConfig | None:
    """Pooling and normalization of a sentence-transformers folder (modules.json), or None if it is not one.

    Our score is a dot product, so a model sentence-transformers scores by cosine is normalized here: its
    similarity_fn_name decides, not only a Normalize module (a cosine model may have none)."""
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
    similarity, why = _st_similarity(folder)
    if similarity == "cosine":
        normalize = True
    elif similarity in ("dot", "dot_product"):
        normalize = "Normalize" in types  # the dot product of what the modules output
    else:
        raise ValueError(f"{folder / 'config_sentence_transformers.json'}: similarity_fn_name {similarity!r} is not "
                         "supported (cosine or dot)")
    logger.info("%s: %s similarity (%s): %s", folder, similarity, why,
                "vectors L2-normalized, scored by dot product" if normalize else "scored by dot product")
    return RepresentationConfig(kind=mode, normalize=normalize)


def folder_config(name_or_path: str | None) -> RepresentationConfig | None:
    """A model folder's own config: representation.json, else its sentence-transformers modules, else None."""
    folder = Path(resolve_model(name_or_path))
    if (folder / CONFIG_NAME).is_file():
        return RepresentationConfig.from_file(folder / CONFIG_NAME)
    return _sentence_transformers_config(folder)


def saved_config(name_or_path: str | None) -> RepresentationConfig:
    """`folder_config`, or the defaults for a folder that has none (a plain HF encoder)."""
    return folder_config(name_or_path) or RepresentationConfig()


def resolve_config(name_or_path: str | None, **overrides) -> RepresentationConfig:
    """The folder's own config with the given options (None = keep) applied: what `--representation`,
    `--normalize` etc. of evaluation, fine-tuning and mining mean. Asking a model that is not saved as dupmae for
    `dupmae` starts from `dupmae_config`, so a sentence embedder keeps its pooling and normalization."""
    overrides = {key: value for key, value in overrides.items() if value is not None}
    base = folder_config(name_or_path)
    if overrides.get("kind") == "dupmae" and (base is None or base.kind != "dupmae"):
        from transformers import AutoConfig

        base = dupmae_config(base, AutoConfig.from_pretrained(resolve_model(name_or_path)).hidden_size)
    return replace(base or RepresentationConfig(), **overrides)


def saved_max_seq_length(folder: str | Path) -> int | None:
    """The length a sentence-transformers folder truncates to (sentence_bert_config.json), or None."""
    st_config = Path(folder) / "sentence_bert_config.json"
    return json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None


class Encoder(nn.Module):
    """A HF encoder plus the pooling (and, for dupmae, the MLM head and the projection W) that make a vector."""

    def __init__(self, model: nn.Module, config: RepresentationConfig, projection: nn.Linear | None = None):
        super().__init__()
        self.config = config
        self.model = model  # AutoModel (cls/mean) or AutoModelForMaskedLM (dupmae)
        self.projection = projection  # dupmae only: W
        self.max_seq_length: int | None = None  # from sentence_bert_config.json when the folder has one

    @classmethod
    def from_pretrained(cls, name_or_path: str | None, config: RepresentationConfig | None = None,
                        projection_file: str | Path | None = None) -> "Encoder":
        """Load a HF / sentence-transformers / DupMAE folder (None or "default": the packaged MiniLM).

        A DupMAE folder keeps its MLM head under any config, so a `mean` fine-tuning of a DupMAE export exports the
        head too, and the result can still be scored as dupmae (its trained sparse half on the tuned encoder).
        Weights load in fp32 whatever dtype they were saved in (our exports are fp32, a bf16 fine-tuning included:
        it saves the fp32 master weights; a folder from elsewhere may hold bf16): bf16 compute is autocast's job
        (`--bf16`), and the projection W is fp32. `projection_file`: W's weights from elsewhere (a pre-training
        export's, for its fine-tuned copy, which has none); default the folder's own."""
        from transformers import AutoModel, AutoModelForMaskedLM

        path = resolve_model(name_or_path)
        folder = Path(path)
        saved = folder_config(path)
        config = config or saved or RepresentationConfig()  # an explicit config wins over the folder's
        # Weights missing from the checkpoint are initialized from a fixed seed without touching the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            if config.kind == "dupmae" or (saved is not None and saved.kind == "dupmae"):
                model, head_missing = load_pretrained(AutoModelForMaskedLM, path, dtype=torch.float32)
                if head_missing and config.kind == "dupmae":
                    logger.warning("%s has no trained MLM head (%d tensors initialized): the sparse part is untrained",
                                   path, len(head_missing))
            else:
                model, _ = load_pretrained(AutoModel, path, dtype=torch.float32)
            projection = None
            if config.kind == "dupmae":
                projection = new_projection(model.config.hidden_size, config.dense_dim)
                if projection_file is not None and not Path(projection_file).is_file():  # asked for: never identity
                    raise FileNotFoundError(f"{projection_file}: no such projection file (the dense half's W)")
                projection_file = Path(projection_file or folder / PROJECTION_NAME)  # dupmae: W's weights
                if projection_file.is_file():
                    from safetensors.torch import load_file

                    projection.load_state_dict(load_file(str(projection_file)))
                else:
                    identity = config.dense_dim == model.config.hidden_size  # the documented start: dense = base
                    (logger.info if identity else logger.warning)(
                        "%s has no %s: projection initialized (%s)", path, PROJECTION_NAME,
                        "identity" if identity else f"seed {INIT_SEED}")
        encoder = cls(model, config, projection)
        encoder.max_seq_length = saved_max_seq_length(folder)
        return encoder

    def with_config(self, config: RepresentationConfig) -> "Encoder":
        """Another representation over the same network (and projection, for dupmae): no weights are copied."""
        if config.kind == "dupmae" and self.projection is None:
            raise ValueError(f"with_config: a {self.config.kind} encoder has no MLM head and projection for dupmae")
        return Encoder(self.model, config, self.projection if config.kind == "dupmae" else None)

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                token_type_ids: Tensor | None = None) -> Representation:
        return self.represent(self.hidden_states(input_ids, attention_mask, token_type_ids), attention_mask)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """The encoder's last hidden states [B, L, H] (the MLM head, if any, is not run)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.model.base_model(**inputs).last_hidden_state

    def represent(self, hidden: Tensor, attention_mask: Tensor) -> Representation:
        """Token states [B, L, H] -> this config's representation (several configs may share one encoder pass)."""
        dense = pool(hidden, attention_mask, self.config.pooling)  # [B, H]
        if self.config.kind != "dupmae":
            return Representation(self._maybe_normalize(dense))
        sparse = sparse_half(self._max_pooled_vocab(hidden, attention_mask), attention_mask, self.config.sparse_values,
                             self.config.normalize)
        return Representation(self._maybe_normalize(self.projection(dense)), sparse)

    def _maybe_normalize(self, dense: Tensor) -> Tensor:
        return F.normalize(dense, dim=-1) if self.config.normalize else dense

    def _max_pooled_vocab(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """μ = max over ordinary tokens of MLMHead(h_i) [B, V] (`vocab_max_pool`: vocabulary chunks, arg-max
        backward), without the head's output bias unless `sparse_bias`."""
        transform, projection = split_mlm_head(self.model)
        bias = projection.bias if self.config.sparse_bias else None
        return vocab_max_pool(hidden, projection.weight, bias, ordinary_tokens(attention_mask), VOCAB_CHUNK, transform)

    def save_pretrained(self, out_dir: str | Path, tokenizer=None) -> None:
        """HF model (+ tokenizer), representation.json, the projection (dupmae) and sentence-transformers modules
        (`common.st_modules`: the dense half for `SentenceTransformer`, and for dupmae sparse/ for `SparseEncoder`).
        Imported here, not at the top: it imports sentence-transformers, which training and evaluation otherwise
        do not need; `common.st_modules` does not import this module (both read `common.sparse`)."""
        from common.st_modules import save_sentence_transformers

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
        save_sentence_transformers(self, out, tokenizer)


#: Sparse-half options of a sentence embedder's dupmae representation (`dupmae_config`), chosen on the train
#: queries of SciFact and of the docstring set (docs/results.md, "Adaptation: development runs").
ZERO_SHOT_SPARSE = {"sparse_bias": False, "sparse_values": "probs", "sparse_weight": 0.2}


def dupmae_config(base: RepresentationConfig | None, hidden_size: int) -> RepresentationConfig:
    """The `dupmae` representation of a model whose own representation is `base` (`folder_config`).

    A dupmae config is kept as it is. A plain encoder (base None) gets the paper's representation: [CLS]
    projected to 384 dims, raw logits, weight 1. A sentence embedder's dense half pools and normalizes as the model
    does (mean + cosine for the packaged MiniLM) through a projection that starts as the identity (dense_dim =
    hidden size), so it keeps its embedding, and its sparse half is ZERO_SHOT_SPARSE (see the module docstring)."""
    if base is None:
        return RepresentationConfig(kind="dupmae")
    if base.kind == "dupmae":
        return base
    return replace(base, kind="dupmae", pooling=base.pooling, dense_dim=hidden_size, **ZERO_SHOT_SPARSE)


def new_projection(hidden_size: int, dense_dim: int) -> nn.Linear:
    """An untrained projection W, initialized from a fixed seed without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        projection = nn.Linear(hidden_size, dense_dim)
        _init_projection(projection)
    return projection


def _init_projection(projection: nn.Linear) -> None:
    """Identity when the shapes allow (zero-shot dense = the pooled state), else a Gaussian that preserves dot
    products on average."""
    with torch.no_grad():
        projection.bias.zero_()
        out_dim, in_dim = projection.weight.shape
        if out_dim == in_dim:
            projection.weight.copy_(torch.eye(out_dim))
        else:
            projection.weight.normal_(0.0, out_dim ** -0.5)
