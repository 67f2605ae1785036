"""Both Beam jobs under a remote runner's conditions, on the DirectRunner: an output folder on an object store
(no folders; an object appears only when its upload is closed), writes killed half-way, local paths under a
remote --runner, byte-identical outputs across runner modes, and no step holding the corpus under one key."""
from __future__ import annotations

import hashlib
import io
import json
import pickle

import pytest
from apache_beam.io.filesystem import BeamIOError, CompressedFile, CompressionTypes, FileMetadata, FileSystem
from apache_beam.runners.portability.fn_api_runner import execution

from common.shard_format import MANIFEST_NAME, Manifest
from preprocessing import finetune_data, ordered_file, pretrain_data
from preprocessing.shards import OutputDirError

IN_MEMORY = ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"]
BUCKET = "objstore://bucket"


class ObjectStore(FileSystem):
    """A Beam FileSystem (registered by being defined) for objstore://: flat keys, no folders, and an object
    that appears only when its upload is closed, as on GCS and S3, also when closed by an exception."""

    objects: dict[str, bytes] = {}
    fail_arrow_files = False  # uploads of Arrow files (not parts) fail half-way, as a killed worker's would

    @classmethod
    def scheme(cls):
        return "objstore"

    def join(self, base, *paths):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in paths)])

    def split(self, path):
        base, _, name = path.rstrip("/").rpartition("/")
        return base, name

    def has_dirs(self):
        return False

    def mkdirs(self, path):
        pass  # no folders

    def _list(self, prefix):
        for key, data in sorted(self.objects.items()):
            if key.startswith(prefix):
                yield FileMetadata(key, len(data), 0.0)

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        return _Upload(self.objects, path)

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        raw = io.BytesIO(self.objects[path])
        compression = FileSystem._get_compression_type(path, compression_type)
        return raw if compression == CompressionTypes.UNCOMPRESSED else CompressedFile(raw, compression)

    def copy(self, sources, destinations):
        for source, destination in zip(sources, destinations):
            self.objects[destination] = self.objects[source]

    def rename(self, sources, destinations):  # a copy, then a delete: no atomic rename on object stores
        self.copy(sources, destinations)
        self.delete(sources)

    def exists(self, path):
        return path in self.objects  # a "folder" never exists

    def size(self, path):
        return len(self.objects[path])

    def last_updated(self, path):
        return 0.0

    def checksum(self, path):
        return hashlib.md5(self.objects[path]).hexdigest()

    def metadata(self, path):
        return FileMetadata(path, len(self.objects[path]), 0.0)

    def delete(self, paths):
        missing = {p: FileNotFoundError(p) for p in paths if p not in self.objects}
        for path in paths:
            self.objects.pop(path, None)
        if missing:
            raise BeamIOError("Delete operation failed", missing)


class _Upload(io.BytesIO):
    def __init__(self, objects: dict, key: str):
        super().__init__()
        self.objects, self.key = objects, key

    def write(self, data):
        data = bytes(data)
        arrow_file = (bytes(self.getbuffer()[:6]) or data[:6]) == b"ARROW1"
        if ObjectStore.fail_arrow_files and arrow_file and self.tell() + len(data) > 200:
            super().write(data[: len(data) // 2])
            raise OSError("simulated kill half-way through an upload")
        return super().write(data)

    def close(self):
        if not self.closed:
            self.objects[self.key] = self.getvalue()  # the object appears only now, whole or half
        super().close()


class FolderStore(ObjectStore):
    """folderstore://: ObjectStore's objects, but with real folders, as on HDFS (has_dirs): creating a file makes
    its folders, a rename fails unless the target's folder exists, and mkdirs refuses a folder that exists."""

    folders: set[str] = set()

    @classmethod
    def scheme(cls):
        return "folderstore"

    def has_dirs(self):
        return True

    def mkdirs(self, path):
        if self.exists(path):
            raise BeamIOError(f"Path already exists: {path}")
        self._add_folders(path)

    def _add_folders(self, path):
        while "/" in path.partition("://")[2]:
            self.folders.add(path)
            path = self.split(path)[0]
        self.folders.add(path)  # the bucket

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        self._add_folders(self.split(path)[0])
        return super().create(path, mime_type, compression_type)

    def rename(self, sources, destinations):
        missing = {d: FileNotFoundError(self.split(d)[0]) for d in destinations if self.split(d)[0] not in self.folders}
        if missing:
            raise BeamIOError("Rename operation failed", missing)
        super().rename(sources, destinations)

    def exists(self, path):
        return path in self.objects or path in self.folders


@pytest.fixture
def store():
    ObjectStore.objects.clear()
    ObjectStore.fail_arrow_files = False
    FolderStore.folders.clear()
    yield ObjectStore.objects
    ObjectStore.objects.clear()
    ObjectStore.fail_arrow_files = False
    FolderStore.folders.clear()


def put_beir(store: dict, corpus_rows: int = 6) -> str:
    corpus = [{"_id": f"d{i}", "title": f"T{i}", "text": f"document number {i} about things"} for i in range(corpus_rows)]
    files = {
        "beir/corpus.jsonl": "".join(json.dumps(r) + "\n" for r in corpus) + "not json\n",
        "beir/queries.jsonl": '{"_id": "q1", "text": "first query"}\n{"_id": "q2", "text": "second"}\n',
        "beir/qrels/train.tsv": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq2\tdX\t1\n",
    }
    for name, text in files.items():
        store[f"{BUCKET}/{name}"] = text.encode()
    return f"{BUCKET}/beir"


def put_texts(store: dict) -> str:
    texts = [f"Sentence {i} of a document. It has two sentences." for i in range(12)]
    store[f"{BUCKET}/in/texts.jsonl"] = ("".join(json.dumps({"text": t}) + "\n" for t in texts) + "{bad\n").encode()
    return f"{BUCKET}/in/texts.jsonl"


def run_job(job: str, store: dict, output: str, *extra: str) -> Manifest:
    if job == "pretrain":
        args = ["--input", put_texts(store), "--num_shards", "2", "--max_seq_length", "16"]
        return pretrain_data.run([*args, "--output_dir", output, *IN_MEMORY, *extra])
    args = ["--data_dir", put_beir(store), "--passage_max_length", "8"]
    return finetune_data.run([*args, "--output_dir", output, *IN_MEMORY, *extra])


def under(store: dict, folder: str) -> list[str]:
    return sorted(k[len(folder) + 1 :] for k in store if k.startswith(folder + "/"))


def assert_manifest_is_the_folder(store: dict, output: str, manifest: Manifest, others: set[str] = frozenset()):
    """Every Arrow object is one of the manifest's files, with its sha256; nothing temporary is left."""
    names = under(store, output)
    assert {n for n in names if n.endswith(".arrow")} == {s.file for s in manifest.shards}
    for shard in manifest.shards:
        assert hashlib.sha256(store[f"{output}/{shard.file}"]).hexdigest() == shard.sha256
    assert set(names) == {s.file for s in manifest.shards} | {MANIFEST_NAME, "dead_letter/dead_letter.jsonl"} | others


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_object_store_folder_refused_then_overwritten(job, store):
    output = f"{BUCKET}/out"
    stale = ["shard-00000-of-00003.arrow", "shard-00002-of-00003.arrow", MANIFEST_NAME, "notes.txt"]
    for name in stale:
        store[f"{output}/{name}"] = b"old"
    with pytest.raises(OutputDirError, match="not empty"):
        run_job(job, store, output)
    assert store[f"{output}/{MANIFEST_NAME}"] == b"old"
    manifest = run_job(job, store, output, "--overwrite")
    assert_manifest_is_the_folder(store, output, manifest, others={"notes.txt"})  # not ours: kept
    assert json.loads(store[f"{output}/{MANIFEST_NAME}"]) == json.loads(json.dumps(_asdict(manifest)))
    assert manifest.counts["dead_letter"] == 1 if job == "pretrain" else manifest.counts["dead_letter"] == 2


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_writes_make_their_folders_where_folders_are_real(job, store):
    """On a filesystem with folders (HDFS) a rename into a missing folder fails: writes make the folder first,
    decided by the filesystem's has_dirs, not by its scheme; object stores (has_dirs False) get none."""
    from apache_beam.io.filesystems import FileSystems

    assert not FileSystems.get_filesystem(f"{BUCKET}/x").has_dirs()
    output = "folderstore://bucket/out"
    manifest = run_job(job, store, output)
    assert_manifest_is_the_folder(store, output, manifest)
    assert f"{output}/dead_letter" in FolderStore.folders


def _asdict(manifest: Manifest) -> dict:
    from dataclasses import asdict

    return asdict(manifest)


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_killed_write_leaves_no_object_under_a_final_name(job, store):
    output = f"{BUCKET}/out"
    ObjectStore.fail_arrow_files = True
    with pytest.raises(Exception, match="simulated kill"):
        run_job(job, store, output)
    names = under(store, output)
    assert not [n for n in names if n.endswith(".arrow") or n == MANIFEST_NAME], names
    ObjectStore.fail_arrow_files = False
    manifest = run_job(job, store, output, "--overwrite")  # over whatever the killed run left
    assert_manifest_is_the_folder(store, output, manifest)


@pytest.mark.parametrize("job", [pretrain_data, finetune_data])
def test_local_output_with_a_remote_runner_is_refused_in_one_line(job, tmp_path, capsys):
    args = ["--input", "gs://b/x.jsonl"] if job is pretrain_data else ["--data_dir", "gs://b/beir"]
    with pytest.raises(SystemExit) as exit_info:
        job.main([*args, "--output_dir", str(tmp_path / "out"), "--runner", "FlinkRunner"])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: --output_dir {tmp_path / 'out'} is a local path, but --runner FlinkRunner")
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_finetune_outputs_are_byte_identical_across_runner_modes(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    corpus = [{"_id": f"d{i}", "text": f"passage {i} text"} for i in range(40)] + [{"_id": "d3", "text": "again"}]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n"
                                                for i in range(8)))
    (beir / "qrels" / "train.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(8)) + "q1\tdY\t1\n")
    unknown = [f"u{i}" for i in range(30)]  # one line, thirty unknown documents: dead letters tied on (file, line)
    (tmp_path / "neg.jsonl").write_text("".join(json.dumps({"query_id": f"q{i}", "negatives": [*unknown, f"d{i + 9}"]})
                                                + "\n" for i in range(8)))
    modes = {"in_memory": "1", "multi_processing": "2", "multi_threading": "2"}
    outputs = {}
    for mode, workers in modes.items():
        out = tmp_path / mode
        finetune_data.run(["--data_dir", str(beir), "--negatives", str(tmp_path / "neg.jsonl"), "--output_dir",
                           str(out), "--direct_running_mode", mode, "--direct_num_workers", workers])
        outputs[mode] = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
                         if p.is_file() and p.name != MANIFEST_NAME}
        assert not (out / "_temporary").exists()
    letters = outputs["in_memory"]["dead_letter/dead_letter.jsonl"].decode().splitlines()
    assert len(letters) == 8 * 30 + 2  # 30 unknown negatives per query, one unknown positive, one repeated id
    assert sorted(outputs["in_memory"]) == ["corpus.arrow", "dead_letter/dead_letter.jsonl", "groups.arrow",
                                            "queries.arrow"]
    assert outputs["multi_processing"] == outputs["in_memory"]
    assert outputs["multi_threading"] == outputs["in_memory"]


def test_no_step_holds_the_corpus_under_one_key(tmp_path, monkeypatch):
    """Every group the runner forms (GroupByKey, CoGroupByKey, combiners) is measured: at most a part's lines
    of elements under any one key, and in every grouping of more than a few kilobytes no key with more than a
    quarter of its bytes (gathering the corpus, as before, put all of it under one key)."""
    rows, lines_per_part = 3000, 250
    monkeypatch.setattr(ordered_file, "LINES_PER_PART", lines_per_part)
    largest_group, shares = 0, []
    partition = execution.GroupingBuffer.partition

    def measured(self, n):
        nonlocal largest_group
        sizes = [len(pickle.dumps(list(values))) for values in self._table.values()]
        largest_group = max([largest_group, *map(len, self._table.values())])
        if sum(sizes) > 20_000:
            shares.append(max(sizes) / sum(sizes))
        return partition(self, n)

    monkeypatch.setattr(execution.GroupingBuffer, "partition", measured)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    corpus = "".join(json.dumps({"_id": f"d{i}", "text": f"passage number {i} with some words"}) + "\n"
                     for i in range(rows))
    (beir / "corpus.jsonl").write_text(corpus + "bad line\n" * rows)  # and as many dead letters
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"q {i}"}) + "\n"
                                                for i in range(rows)))
    (beir / "qrels" / "train.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(rows)))
    manifest = finetune_data.run(["--data_dir", str(beir), "--output_dir", str(tmp_path / "out"), *IN_MEMORY])
    assert (manifest.counts["documents"], manifest.counts["groups"], manifest.counts["dead_letter"]) == (rows, rows, rows)
    assert 0 < largest_group <= lines_per_part
    assert len(shares) >= 5 and max(shares) <= 0.25, shares


def test_shards_are_sized_by_the_records_not_the_compressed_file(tmp_path, monkeypatch):
    import gzip
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from preprocessing import records

    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(60)),
                         "id": str(i)}) + "\n" for i in range(2000)]
    plain = "".join(lines).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(plain))
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in lines]), tmp_path / "b.parquet")
    gz, parquet = records.expand_inputs([str(tmp_path / "*.gz"), str(tmp_path / "*.parquet")])
    assert gz.size < len(plain) / 4  # compressed well: its stored size would give a quarter of the shards
    assert records.content_bytes(gz, "auto", ["text"]) == len(plain)  # sampled whole: exact
    monkeypatch.setattr(records, "SAMPLE_BYTES", gz.size // 5)
    assert abs(records.content_bytes(gz, "auto", ["text"]) / len(plain) - 1) < 0.1
    texts = sum(len(json.loads(line)["text"]) for line in lines)
    assert 1 <= records.content_bytes(parquet, "auto", ["text"]) / texts < 1.1  # the text column only


def test_job_request_carries_a_tokenizer_path_not_the_vocabulary(tmp_path, minilm_path):
    """Dataflow refuses job requests over 10 MB: the pipeline's size must not grow with the vocabulary."""
    import apache_beam as beam
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from common.tokenizer import load_tokenizer
    from preprocessing.writes import OutputDir

    (tmp_path / "qrels").mkdir()
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv"):
        (tmp_path / name).write_text("{}\n")
    tiny = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tiny.pre_tokenizer = pre_tokenizers.Whitespace()
    sizes = []
    for tokenizer in (load_tokenizer(minilm_path), PreTrainedTokenizerFast(tokenizer_object=tiny)):
        cfg = finetune_data.FinetuneDataConfig(data_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
        pipeline = beam.Pipeline()
        finetune_data.build_pipeline(pipeline, cfg, finetune_data.input_files(cfg), tokenizer, [],
                                     OutputDir(cfg.output_dir, "run"))
        sizes.append(len(pipeline.to_runner_api().SerializeToString()))
    assert abs(sizes[0] - sizes[1]) < 2000, sizes  # 30k-entry vocabulary or 2 entries: the same request


def test_a_large_input_file_is_named_in_a_warning(tmp_path, monkeypatch, caplog):
    from preprocessing import records

    (tmp_path / "small.jsonl").write_text("{}\n")
    (tmp_path / "large.jsonl").write_text("{}\n" * 100)
    monkeypatch.setattr(records, "LARGE_INPUT_BYTES", 100)
    with caplog.at_level("WARNING", logger="preprocessing.records"):
        records.expand_inputs([str(tmp_path / "*.jsonl")])
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == [f"input {tmp_path / 'large.jsonl'}"]
    assert "one worker reads it from start to end" in caplog.records[0].getMessage()


def test_a_worker_process_freezes_its_heap_once():
    import subprocess
    import sys

    worker = ("import gc; from preprocessing.runner import setup_worker_process; setup_worker_process(1, -1); "
              "first = gc.get_freeze_count(); garbage = [[i] for i in range(10000)]; del garbage; "
              "kept = [[i] for i in range(1000)]; setup_worker_process(1, -1); print(gc.get_freeze_count() == first)")
    done = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True"]
