"""DupMAE (RetroMAE v2) around a HF masked-LM encoder: one model, three losses (see ../shared/DUPMAE.md).

    L = w_mlm · L_MLM(encoder, masked positions) + w_dec · L_dec([CLS] decoding) + w_bow · L_BoW(OT decoding)

RetroMAE is the same model with bow_weight = 0 (the BoW branch is then skipped); plain MLM has decoder_weight = 0
too (no decoder is built). `objective = "official"` computes what staoxiao/RetroMAE's DupMAEForPretraining (and,
with bow_weight 0, its RetroMAEForPretraining) computes: `benchmarks/official_parity.py` shows it step for step.
The decoder's prediction head is the encoder's MLM head (shared weights, tied to the word embeddings as in BERT).

Memory: no [B, L, V] tensor exists. MLM logits are computed only at the masked positions and decoder
logits only at the positions with a target, together in one `linear_cross_entropy` call (row chunks,
gradient formed in forward); the OT max-pool runs in vocabulary chunks keeping only arg-max indices
(`common.vocab_pooling`). Every softmax runs in fp32, so the model may be cast to bf16 as a whole (DeepSpeed).
What is left is the encoder's own activations (dropout keeps CPU attention on the plain path, one
[B, heads, L, L] map per layer); `cpu_attention` (on CPU) keeps only a bool dropout mask per layer and
recomputes the map in backward, and `gradient_checkpointing` recomputes whole layers.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from common.defaults import resolve_model
from common.model_loading import load_pretrained
from common.representation import (Encoder, RepresentationConfig, dupmae_config, folder_config, new_projection,
                                   saved_max_seq_length)
from pretrain.cpu_attention import use_fast_cpu_attention
from pretrain.enhanced_decoder import EnhancedDecoderLayer
from pretrain.linear_ce import linear_cross_entropy
from common.vocab_pooling import split_mlm_head, vocab_max_pool
from pretrain.bow_loss import bow_loss, official_bow_weights

logger = logging.getLogger(__name__)

#: Each objective and its default BoW weight (the paper's Eq. 9 is unweighted; the official run uses 0.1).
OBJECTIVES = {"paper": 1.0, "official": 0.1}

#: Files an export folder holds beside the HF model: the decoder (for continued pre-training) and our config.
DECODER_FILE = "dupmae_decoder.safetensors"
CONFIG_FILE = "dupmae_config.json"


@dataclass
class DupMAEConfig:
    """Loss weights and memory knobs of the pre-training model."""

    mlm_weight: float = field(default=1.0, metadata={"help": "weight of the encoder MLM loss"})
    decoder_weight: float = field(default=1.0, metadata={"help": "weight of the [CLS]-decoding loss"})
    bow_weight: float | None = field(
        default=None, metadata={"help": "weight of the OT bag-of-words loss (default: 1 for --objective paper, 0.1 "
                                        "for official; 0 = RetroMAE)"})
    objective: Literal["paper", "official"] = field(
        default="paper", metadata={"help": "paper: the paper's BoW (max over the unmasked ordinary tokens, target "
                                           "1/|unique| per unique token, weight 1); official: staoxiao/RetroMAE's "
                                           "code (max over positions 1..n+1, masked tokens and [SEP] included; "
                                           "target 1/n per unique token; weight 0.1; with --bow_weight 0 the "
                                           "decoder query of its RetroMAEForPretraining)"})
    bow_include_masked: bool = field(
        default=False, metadata={"help": "paper objective: BoW max-pool over all ordinary tokens, encoder-masked ones "
                                         "too; default: the unmasked ones only (paper); --objective official pools "
                                         "[SEP] as well"})
    decoder_query: Literal["embedded", "summed"] | None = field(
        default=None, metadata={"help": "the decoder's query stream: embedded = LN(h_CLS + p_i + type_0) (the paper "
                                        "and the official DupMAEForPretraining), summed = h_CLS + p_i (the official "
                                        "RetroMAEForPretraining); default: summed for --objective official with "
                                        "--bow_weight 0, else embedded"})
    vocab_chunk_size: int = field(
        default=4096, metadata={"help": "vocabulary columns scored at once in the OT max-pool"})
    ce_chunk_size: int = field(
        default=256, metadata={"help": "rows of [rows, V] fp32 logits materialized at once in the MLM + decoder loss"})
    cpu_attention: bool = field(
        default=True, metadata={"help": "on CPU, attention with a fast dropout mask that keeps no [B, heads, L, L] "
                                        "map for backward (GPU: SDPA either way); false: HF's SDPA attention"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute encoder layers and the decoder in backward: about a fifth less "
                                         "peak memory for about 16 percent more time per step"})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"DupMAEConfig.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.bow_weight is None:
            self.bow_weight = OBJECTIVES[self.objective]
        if self.decoder_query is None:
            official_retromae = self.objective == "official" and self.bow_weight == 0
            self.decoder_query = "summed" if official_retromae else "embedded"
        if self.decoder_query not in ("embedded", "summed"):
            raise ValueError(f"DupMAEConfig.decoder_query must be embedded or summed, got {self.decoder_query!r}")
        for name in ("mlm_weight", "decoder_weight", "bow_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"DupMAEConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.mlm_weight + self.decoder_weight + self.bow_weight == 0:
            raise ValueError("DupMAEConfig: all loss weights are 0; nothing to train")
        for name in ("vocab_chunk_size", "ce_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DupMAEConfig.{name} must be positive, got {getattr(self, name)}")


@dataclass
class DupMAEOutput:
    """Every loss term and metric as 0-dim fp32 tensors (bow_* are 0 when bow_weight is 0: not computed).

    mlm_accuracy / decoder_accuracy: arg-max == label over the positions that have a target.
    bow_recall: |top-k(μ) ∩ unique tokens| / k, k = the block's number of unique tokens, averaged over rows.
    """

    loss: Tensor
    mlm_loss: Tensor
    decoder_loss: Tensor
    bow_loss: Tensor
    mlm_accuracy: Tensor
    decoder_accuracy: Tensor
    bow_recall: Tensor


def _enable_checkpointing(mlm: nn.Module) -> None:
    """HF's per-layer activation checkpointing, non-reentrant (dropout replays with the saved RNG state)."""
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(mlm, "activation_checkpointing_enable"):  # the name since transformers 5.x; older: the alias
            mlm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            mlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as exc:
        raise ValueError(f"gradient_checkpointing: {type(mlm).__name__} does not support it ({exc})") from None


def _config_from_file(path: str):
    """A transformers config from a JSON file that names its model_type (random-init models for tests)."""
    from transformers import AutoConfig

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model_config_file {path}: {exc}") from None
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"model_config_file {path}: no 'model_type' field")
    return AutoConfig.for_model(model_type, **raw)


class DupMAEModel(nn.Module):
    """Encoder + MLM head (`self.mlm`, an AutoModelForMaskedLM) and the enhanced decoder layer (None when
    decoder_weight is 0).

    `encoder_frozen` (set by the trainer for the first --freeze_encoder_steps): the encoder runs without autograd,
    so only the new parts (MLM head transform and bias, decoder) get gradients and no encoder backward is paid.
    """

    def __init__(self, mlm: nn.Module, config: DupMAEConfig, representation: RepresentationConfig | None = None):
        super().__init__()
        self.config = config
        self.mlm = mlm
        #: The retrieval representation the export records (see `common.representation.dupmae_config`).
        self.representation = representation or dupmae_config(None, mlm.config.hidden_size)
        self.decoder = (EnhancedDecoderLayer(mlm.config, cpu_attention=config.cpu_attention)
                        if config.decoder_weight > 0 else None)
        self.encoder_frozen = False
        self.new_head = False  # the MLM head was initialized here (from_pretrained sets it), not loaded
        self.max_seq_length: int | None = None  # the base folder's (sentence_bert_config.json), kept by the export
        split_mlm_head(mlm)  # fail at construction, not at the first step
        if config.cpu_attention:
            use_fast_cpu_attention(mlm)
        if config.gradient_checkpointing:
            _enable_checkpointing(mlm)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str | None, config: DupMAEConfig,
                        model_config_overrides: str | None = None,
                        model_config_file: str | None = None) -> "DupMAEModel":
        """Load weights (None/"default": the packaged MiniLM), or build a random-init model from a config.

        model_config_overrides ("hidden_size=32,num_hidden_layers=2"): the named model's config, edited, random
        init; model_config_file: a config JSON, random init. An export folder of ours restores the decoder too.
        """
        from transformers import AutoConfig, AutoModelForMaskedLM

        path = resolve_model(model_name_or_path)
        if model_config_overrides and model_config_file:
            raise ValueError("give model_config_overrides or model_config_file, not both")
        head_missing: list[str] = []
        try:
            if model_config_file:
                mlm = AutoModelForMaskedLM.from_config(_config_from_file(model_config_file))
                logger.info("built %s from %s with random weights", type(mlm).__name__, model_config_file)
            elif model_config_overrides:
                hf_config = AutoConfig.from_pretrained(path)
                hf_config.update_from_string(model_config_overrides)
                mlm = AutoModelForMaskedLM.from_config(hf_config)
                logger.info("built %s from %s's config with %s, random weights", type(mlm).__name__, path,
                            model_config_overrides)
            else:
                mlm, head_missing = load_pretrained(AutoModelForMaskedLM, path)
                if head_missing:
                    logger.info("%s has no MLM head: initialized %d head tensors (%s)", path, len(head_missing),
                                   ", ".join(sorted(head_missing)))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot build model from {model_name_or_path!r} (resolved to {path!r}): "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        base = None if model_config_overrides or model_config_file else folder_config(path)
        model = cls(mlm, config, dupmae_config(base, mlm.config.hidden_size))
        model.new_head = bool(head_missing or model_config_overrides or model_config_file)
        if not (model_config_overrides or model_config_file):
            model.max_seq_length = saved_max_seq_length(path)
        decoder_file = Path(path) / DECODER_FILE
        if model.decoder is not None and not (model_config_overrides or model_config_file) and decoder_file.is_file():
            from safetensors.torch import load_file

            model.decoder.load_state_dict(load_file(str(decoder_file)))
            logger.info("restored the decoder from %s", decoder_file)
        return model

    @torch.no_grad()
    def init_head_bias(self, log_prior: Tensor) -> None:
        """Start the MLM head's output bias at the corpus's log unigram frequencies (centered).

        A new head otherwise spends its first steps learning which tokens are common, and a learning rate that
        moves each weight by about 1e-3 per step takes thousands of steps to shift a bias by the ~10 nats between
        frequent and rare tokens. Starting there, the head learns context from the first step, and the bias keeps
        the corpus prior apart from the evidence of each text (the `sparse_bias` = False representation)."""
        bias = split_mlm_head(self.mlm)[1].bias
        if bias is None:
            raise ValueError(f"{type(self.mlm).__name__}: the MLM head has no output bias to initialize")
        bias.copy_((log_prior - log_prior.mean()).to(bias))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, decoder_input_ids: Tensor,
                decoder_attention_mask: Tensor, decoder_labels: Tensor, bow_ids: Tensor | None = None,
                bow_weights: Tensor | None = None) -> DupMAEOutput:
        """Batch from `pretrain.collator.DupMAECollator` (shapes there); returns every loss term."""
        cfg = self.config
        transform, projection = split_mlm_head(self.mlm)
        weight, bias = projection.weight, projection.bias  # [V, H], [V]
        with torch.no_grad() if self.encoder_frozen else contextlib.nullcontext():
            hidden = self.mlm.base_model(input_ids=input_ids,
                                         attention_mask=attention_mask).last_hidden_state  # [B, L, H]

        # Encoder MLM at the masked positions and [CLS] decoding at every ordinary token, in one fused call:
        # each row's weight is its term's loss weight over the term's row count (the two means, weighted).
        masked = labels != -100  # [B, L]
        targets = decoder_labels != -100  # [B, L]
        if self.decoder is None:  # plain MLM: no decoder rows
            decoded_rows, decoded_labels = hidden.new_zeros(0, hidden.shape[-1]), labels.new_zeros(0)  # [0, H], [0]
        else:
            decoded = self._decode(hidden[:, :1], decoder_input_ids, decoder_attention_mask.bool())  # [B, L, H]
            decoded_rows, decoded_labels = decoded[targets], decoder_labels[targets]  # [T, H], [T]
        n_masked, n_targets = int(masked.sum()), len(decoded_labels)
        rows = transform(torch.cat([hidden[masked], decoded_rows]))  # [M + T, H]
        row_labels = torch.cat([labels[masked], decoded_labels])  # [M + T]
        row_weights = torch.cat([rows.new_full((n_masked,), cfg.mlm_weight / max(n_masked, 1), dtype=torch.float32),
                                 rows.new_full((n_targets,), cfg.decoder_weight / max(n_targets, 1),
                                               dtype=torch.float32)])
        weighted, per_row, correct = linear_cross_entropy(rows, weight, bias, row_labels, row_weights,
                                                          cfg.ce_chunk_size)
        mlm_loss = per_row[:n_masked].sum() / max(n_masked, 1)
        decoder_loss = per_row[n_masked:].sum() / max(n_targets, 1)

        zero = mlm_loss.new_zeros(())
        bow, recall = zero, zero
        if cfg.bow_weight > 0:
            if bow_ids is None or bow_weights is None:
                raise ValueError("bow_weight > 0 needs bow_ids and bow_weights in the batch")
            if cfg.objective == "official":  # `ot_embedding(logits[:, 1:], attention_mask[:, 1:])`: [SEP] too
                keep = attention_mask.bool() & (torch.arange(attention_mask.shape[1], device=hidden.device) > 0)
                bow_weights = official_bow_weights(bow_weights, targets.sum(1))
            else:
                keep = targets if cfg.bow_include_masked else targets & ~masked  # [B, L]
            pooled = vocab_max_pool(hidden, weight, bias, keep, cfg.vocab_chunk_size, transform)  # [B, V]
            bow, recall = bow_loss(pooled, bow_ids.long(), bow_weights, keep.any(1))

        loss = weighted + cfg.bow_weight * bow if cfg.bow_weight > 0 else weighted
        return DupMAEOutput(
            loss=loss, mlm_loss=mlm_loss, decoder_loss=decoder_loss, bow_loss=bow.detach(),
            mlm_accuracy=correct[:n_masked].float().sum() / max(n_masked, 1),
            decoder_accuracy=correct[n_masked:].float().sum() / max(n_targets, 1), bow_recall=recall)

    def _decode(self, cls_hidden: Tensor, decoder_input_ids: Tensor, visible: Tensor) -> Tensor:
        """cls_hidden [B, 1, H], decoder_input_ids [B, L] (unmasked), visible [B, L, L] -> decoder states [B, L, H]."""
        embeddings = self.mlm.base_model.embeddings
        length = decoder_input_ids.shape[1]
        tokens = embeddings(input_ids=decoder_input_ids)  # [B, L, H]
        kv_states = torch.cat([cls_hidden, tokens[:, 1:]], dim=1)  # [B, L, H]: h_CLS replaces position 0
        if self.config.decoder_query == "summed":  # RetroMAEForPretraining: p_i + h_CLS, no LayerNorm
            positions = torch.arange(length, device=decoder_input_ids.device)
            query_states = embeddings.position_embeddings(positions)[None] + cls_hidden  # [B, L, H]
        else:
            query_states = embeddings(inputs_embeds=cls_hidden.expand(-1, length, -1))  # [B, L, H]
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.decoder, query_states, kv_states, visible, use_reentrant=False)
        return self.decoder(query_states, kv_states, visible)

    def save_export(self, out_dir: str, tokenizer) -> None:
        """Encoder + MLM head as a HF folder with the `dupmae` representation (projection initialized as
        `common.representation` does: the identity when square), plus the decoder and the loss config. The base
        model's max_seq_length is kept, so a default evaluation of the export truncates as the base does."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        encoder = Encoder(self.mlm, self.representation, new_projection(self.mlm.config.hidden_size,
                                                                        self.representation.dense_dim))
        encoder.max_seq_length = self.max_seq_length
        encoder.save_pretrained(out, tokenizer)
        if self.decoder is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in self.decoder.state_dict().items()}
            save_file(state, str(out / DECODER_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
