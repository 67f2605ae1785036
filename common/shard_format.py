"""The contract between preprocessing and training: Arrow shard columns and `manifest.json`.

Written by `preprocessing.pretrain_data`, read (memory-mapped) by `pretrain.data`. Bump SCHEMA_VERSION on
any change of columns or their meaning; readers refuse versions they do not know.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

#: One row per packed block. No special tokens are stored: the collator adds [CLS]/[SEP].
PRETRAIN_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),  # source document id ("file:line" when the input has none)
        pa.field("input_ids", pa.list_(pa.int32())),  # block tokens, at most max_seq_length - 2
        pa.field("word_starts", pa.list_(pa.bool_())),  # True where a token begins a whole word
        pa.field("bow_ids", pa.list_(pa.int32())),  # unique token ids of the block, ascending
        pa.field("bow_weights", pa.list_(pa.float32())),  # target weights aligned with bow_ids, sum 1
    ]
)

#: Fine-tuning data from `preprocessing.finetune_data`: three Arrow files beside one manifest (kind "finetune").
#: Texts are tokenized without special tokens and cut at the job's max lengths; documents are title + " " + text.
FINETUNE_CORPUS_FILE = "corpus.arrow"
FINETUNE_QUERIES_FILE = "queries.arrow"
FINETUNE_GROUPS_FILE = "groups.arrow"
FINETUNE_CORPUS_SCHEMA = pa.schema([pa.field("doc_id", pa.string()), pa.field("input_ids", pa.list_(pa.int32()))])
FINETUNE_QUERIES_SCHEMA = pa.schema([pa.field("query_id", pa.string()), pa.field("input_ids", pa.list_(pa.int32()))])
FINETUNE_GROUPS_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string()),
        pa.field("positive_ids", pa.list_(pa.string())),  # qrels score > 0
        pa.field("negative_ids", pa.list_(pa.string())),  # ranked hard negatives, positives removed
    ]
)


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.arrow"


@dataclass
class ShardInfo:
    file: str  # file name relative to the manifest's folder
    rows: int
    sha256: str


@dataclass
class Manifest:
    """Everything a reader needs to trust and use a shard folder."""

    kind: str  # "pretrain" or "finetune"
    tokenizer: str  # name or path given to the job
    vocab_hash: str  # common.tokenizer.vocab_hash of that tokenizer
    max_seq_length: int
    shards: list[ShardInfo]
    counts: dict[str, int]  # documents, blocks, tokens, dead_letter, ...
    options: dict  # every option the job ran with
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    def write(self, folder: str | Path) -> None:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no manifest; is {folder} the output_dir of a preprocessing job?")
        raw = json.loads(path.read_text())
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema_version {version} is not supported (expected {SCHEMA_VERSION})")
        raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
        return cls(**raw)
