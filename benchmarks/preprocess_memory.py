"""Peak memory of the Beam jobs' workers: flat in the corpus size (fine-tuning data), at most 2x a shard (pre-training).

    python benchmarks/preprocess_memory.py [--rows 10000 100000 1000000] [--shard_mb 128]
                                           [--parts finetune floor groups shard]
    python benchmarks/preprocess_memory.py --smoke     # 300 rows, a 4 MiB shard

`finetune`: preprocessing.finetune_data on synthetic BEIR folders of --rows passages (about 30 words each; a
query and a qrels line per 10 passages), run as `python -m` on the DirectRunner in multi-processing mode with 2
workers. Every process of the run is polled every 0.2 s for its own VmHWM (/proc/PID/status: a high-water mark,
so only growth in a process's last 0.2 s could be missed); a worker's figure is the largest over the worker
processes. One line per size, and the `baseline` of each is the smallest size: the ratio is how much a worker's
peak grew with the corpus (flat: about 1; gathering the corpus under one key, as before issue 37, grew it in
proportion). The launcher's own peak is printed beside it: the DirectRunner keeps its shuffle in the launcher's
memory, where Dataflow, Flink and Spark keep it in their shuffle service or on disk.

The DirectRunner hands each worker its share of a stage's input as one bundle (its ParallelBundleManager splits the
input by the number of workers: half the corpus each with 2), so its workers' peaks may grow with the corpus
whatever the job does; Dataflow, Flink and Spark stream bundles of a few thousand elements. `floor` measures that
runner floor apart, with none of the job's code past the read: the same corpus file read (`ReadRecords`, which
streams) and counted, in the same mode, `streamed` straight and `shuffled` through a Reshuffle (a GroupByKey; every
step of the job past its reads follows one); a line per shape and size, the baseline again the smallest size.
`groups` measures what the job itself gathers: the same job in one process (in_memory), with the runner's grouping
table measured at every GroupByKey, CoGroupByKey and combiner: the most elements, and the most pickled bytes, under
any one key. Gathering the corpus under one key made these grow with the corpus; the baseline is again the smallest
size.

`shard`: a worker writing one pre-training shard of about --shard_mb MiB, in a fresh process: the shard's
documents arrive pickled (made beforehand by the parent), as a runner hands a group to a worker; the figure is
the process's VmHWM minus its VmRSS before they arrived, against the shard file's size. The baseline is the former write in the same
process kind: the whole table built, then serialized into one buffer, then copied out (issue 37 item 3).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import smoke  # noqa: E402
from common.memory import peak_rss_bytes  # noqa: E402

#: The DirectRunner as the demo runs it: worker processes, 2 of them.
MULTI_PROCESSING = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
WORDS = ("the of and to in is was for on that with as by at from his her which are this be an had not but "
         "protein cell gene patient study effect risk model data blood brain cancer dose trial result").split()


def vm_hwm_kib(pid: int) -> int:
    """A process's own peak resident memory (VmHWM), KiB; 0 once it is gone (or a zombie, without memory)."""
    try:
        return peak_rss_bytes(pid) // 1024
    except (OSError, RuntimeError):
        return 0


def write_beir(folder: Path, rows: int) -> None:
    rng = random.Random(rows)
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as corpus:
        for i in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(30))
            corpus.write(json.dumps({"_id": f"d{i}", "title": f"passage {i}", "text": text}) + "\n")
    queries = range(0, rows, 10)
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i} {rng.choice(WORDS)}"})
                                                  + "\n" for i in queries))
    (folder / "qrels" / "train.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in queries))


def beir_folder(rows: int, tmp: Path) -> Path:
    """The synthetic BEIR folder of `rows` passages in `tmp`, written once for every part that reads it."""
    data = tmp / f"beir-{rows}"
    if not data.is_dir():
        write_beir(data, rows)
    return data


def finetune_peaks(rows: int, tmp: Path) -> dict:
    """Run the job on `rows` passages; the peak of each process of the run, MiB."""
    data = beir_folder(rows, tmp)
    return run_peaks([sys.executable, "-m", "preprocessing.finetune_data", "--data_dir", str(data), "--output_dir",
                      str(tmp / f"ft-{rows}"), *MULTI_PROCESSING], f"finetune_data on {rows} rows")


def floor_child(shape: str, corpus: str) -> None:
    """In this process (the launcher): the runner floor, a pipeline of Beam's transforms alone over the corpus file:
    read it (our ReadRecords, which streams) and count it, through a Reshuffle (a GroupByKey) when `shuffled`."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from preprocessing.records import InputFile, ReadRecords

    with beam.Pipeline(options=PipelineOptions(MULTI_PROCESSING)) as pipeline:
        records = (pipeline | beam.Create([InputFile(0, corpus, Path(corpus).name, Path(corpus).stat().st_size)])
                   | beam.ParDo(ReadRecords("jsonl", ())))
        if shape == "shuffled":
            records = records | beam.Reshuffle()
        _ = records | beam.Map(lambda record: 1) | beam.CombineGlobally(sum)


def floor_peaks(shape: str, rows: int, tmp: Path) -> dict:
    corpus = beir_folder(rows, tmp) / "corpus.jsonl"
    return run_peaks([sys.executable, __file__, "--floor_child", shape, "--folder", str(corpus)],
                     f"the {shape} floor on {rows} rows")


def run_peaks(command: list[str], what: str) -> dict:
    """Run `command` (a Beam launcher) to its end, polling the own peak of it and of each worker it starts; MiB."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(job.stderr), daemon=True)
    reader.start()
    launcher = psutil.Process(job.pid)
    while job.poll() is None:
        try:
            processes = [launcher, *launcher.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for process in processes:
            peaks[process.pid] = max(peaks.get(process.pid, 0), vm_hwm_kib(process.pid))
        time.sleep(0.2)
    reader.join()
    if job.returncode != 0:
        sys.exit(f"{what} failed:\n{''.join(stderr)[-3000:]}")
    workers = [kib for pid, kib in peaks.items() if pid != job.pid]
    if not workers:
        sys.exit("no worker process was seen: the job ran in the launcher")
    return {"worker_mib": round(max(workers) / 1024, 1), "launcher_mib": round(peaks.get(job.pid, 0) / 1024, 1),
            "workers_seen": len(workers), "seconds": round(time.monotonic() - start, 1)}


def groups_child(rows: int, folder: str) -> None:
    """In this process: the job in_memory on `rows` passages, every runner grouping measured; prints JSON."""
    import pickle as pickle_module

    from apache_beam.runners.portability.fn_api_runner import execution

    from preprocessing import finetune_data

    largest = {"elements": 0, "bytes": 0}
    partition = execution.GroupingBuffer.partition

    def measured(self, n):
        if self._table:
            values = max(self._table.values(), key=len)
            largest["elements"] = max(largest["elements"], len(values))
            largest["bytes"] = max(largest["bytes"], len(pickle_module.dumps(list(values))))
        return partition(self, n)

    execution.GroupingBuffer.partition = measured
    write_beir(Path(folder) / "beir", rows)
    finetune_data.run(["--data_dir", str(Path(folder) / "beir"), "--output_dir", str(Path(folder) / "out"),
                       "--direct_running_mode", "in_memory", "--direct_num_workers", "1"])
    print(json.dumps(largest))


def largest_group(rows: int, tmp: Path) -> dict:
    folder = tmp / f"groups-{rows}"
    folder.mkdir()
    command = [sys.executable, __file__, "--groups_child", str(rows), "--folder", str(folder)]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"groups run on {rows} rows failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def shard_documents(target_bytes: int, seed: int = 0) -> list:
    """Packed documents of about `target_bytes` of shard file (13 bytes a token: id, word start, BoW)."""
    from preprocessing.packing import pack_document

    rng = np.random.default_rng(seed)
    documents, total, line = [], 0, 0
    while total < target_bytes:
        line += 1
        tokens = int(rng.integers(200, 4000))
        ids = rng.integers(1000, 30000, tokens, dtype=np.int32)
        lengths = [25] * (tokens // 25) + ([tokens % 25] if tokens % 25 else [])
        starts = rng.random(tokens) < 0.8
        document = pack_document((0, line), f"doc{line}", ids, starts, lengths, 510, 0.0, random.Random(line), "uniform")
        documents.append(document)
        total += 13 * tokens
    return documents


def shard_child(mode: str, group: str, folder: str) -> None:
    """In a fresh process: the shard's pickled documents arrive (as a runner hands a group), then one write;
    prints its figures as JSON. The peak counts from before the group arrived."""
    import pyarrow as pa

    from common.shard_format import PRETRAIN_SCHEMA
    from preprocessing.shards import blocks_table, write_shard
    from preprocessing.writes import ROWS_PER_BATCH, OutputDir

    rss_before = psutil.Process().memory_info().rss
    with open(group, "rb") as source:
        encoded = pickle.load(source)
    if mode == "ours":
        write_shard(OutputDir(folder), 0, 1, (pickle.loads(e) for e in encoded))
    else:  # the former write_shard + write_arrow: a whole table, one serialized buffer, a bytes copy
        documents = sorted((pickle.loads(e) for e in encoded), key=lambda d: d.key)
        table = blocks_table(documents)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, PRETRAIN_SCHEMA) as writer:
            writer.write_table(table, max_chunksize=ROWS_PER_BATCH)
        data = sink.getvalue().to_pybytes()
        (Path(folder) / "shard-00000-of-00001.arrow").write_bytes(data)
    file_bytes = (Path(folder) / "shard-00000-of-00001.arrow").stat().st_size
    peak = peak_rss_bytes()
    print(json.dumps({"extra_bytes": peak - rss_before, "file_bytes": file_bytes,
                      "pickled_bytes": sum(map(len, encoded))}))


def shard_ratio(mode: str, group: Path, tmp: Path) -> dict:
    folder = tmp / f"shard-{mode}"
    folder.mkdir()
    command = [sys.executable, __file__, "--shard_child", mode, "--group", str(group), "--folder", str(folder)]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"shard write ({mode}) failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {**figures, "ratio": figures["extra_bytes"] / figures["file_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="fine-tuning corpus sizes, smallest first (the smallest is the baseline)")
    parser.add_argument("--shard_mb", type=float, default=128.0, help="pre-training shard size to write")
    parser.add_argument("--parts", nargs="+", default=["finetune", "floor", "groups", "shard"],
                        choices=["finetune", "floor", "groups", "shard"])
    parser.add_argument("--floor_child", choices=["streamed", "shuffled"], help=argparse.SUPPRESS)
    parser.add_argument("--groups_child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shard_child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    args = smoke.parse_args(parser, rows=[300], shard_mb=4.0)
    if args.shard_child:
        shard_child(args.shard_child, args.group, args.folder)
        return
    if args.floor_child:
        floor_child(args.floor_child, args.folder)
        return
    if args.groups_child:
        groups_child(args.groups_child, args.folder)
        return
    cpu = f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} before"
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if "finetune" in args.parts:
            sizes = sorted(args.rows)
            first = None
            for rows in sizes:
                peaks = finetune_peaks(rows, tmp)
                first = first or peaks
                print(json.dumps({
                    "bench": "preprocess_memory", "metric": "finetune_worker_peak_rss", "unit": "MiB",
                    "ours": peaks["worker_mib"], "baseline": first["worker_mib"],
                    "ratio": round(peaks["worker_mib"] / first["worker_mib"], 3), "better": "lower", "rows": rows,
                    "baseline_rows": sizes[0], "launcher_peak_mib": peaks["launcher_mib"],
                    "baseline_launcher_peak_mib": first["launcher_mib"], "workers_seen": peaks["workers_seen"],
                    "seconds": peaks["seconds"], "runner": "DirectRunner multi_processing, 2 workers", "cpu": cpu,
                    "smoke": args.smoke,
                }), flush=True)
        if "floor" in args.parts:
            for shape in ("streamed", "shuffled"):
                sizes, first = sorted(args.rows), None
                for rows in sizes:
                    peaks = floor_peaks(shape, rows, tmp)
                    first = first or peaks
                    print(json.dumps({
                        "bench": "preprocess_memory", "metric": f"runner_floor_{shape}_worker_peak_rss", "unit": "MiB",
                        "ours": peaks["worker_mib"], "baseline": first["worker_mib"],
                        "ratio": round(peaks["worker_mib"] / first["worker_mib"], 3), "better": "lower", "rows": rows,
                        "baseline_rows": sizes[0], "launcher_peak_mib": peaks["launcher_mib"],
                        "workers_seen": peaks["workers_seen"], "seconds": peaks["seconds"],
                        "runner": "DirectRunner multi_processing, 2 workers", "cpu": cpu, "smoke": args.smoke,
                    }), flush=True)
        if "groups" in args.parts:
            sizes, first = sorted(args.rows), None
            for rows in sizes:
                largest = largest_group(rows, tmp)
                first = first or largest
                print(json.dumps({
                    "bench": "preprocess_memory", "metric": "finetune_largest_group", "unit": "pickled bytes under one key",
                    "ours": largest["bytes"], "baseline": first["bytes"], "ratio": round(largest["bytes"] / first["bytes"], 3),
                    "better": "lower", "rows": rows, "baseline_rows": sizes[0], "elements": largest["elements"],
                    "baseline_elements": first["elements"], "runner": "DirectRunner in_memory", "cpu": cpu,
                    "smoke": args.smoke,
                }), flush=True)
        if "shard" in args.parts:
            group = tmp / "group.pkl"  # made here, so that making it does not count in a writer's peak
            with open(group, "wb") as out:
                pickle.dump([pickle.dumps(d) for d in shard_documents(int(args.shard_mb * 2**20))], out)
            ours, base = (shard_ratio(mode, group, tmp) for mode in ("ours", "baseline"))
            print(json.dumps({
                "bench": "preprocess_memory", "metric": "shard_peak_over_file_size", "unit": "x file size",
                "ours": round(ours["ratio"], 3), "baseline": round(base["ratio"], 3),
                "ratio": round(ours["ratio"] / base["ratio"], 3), "better": "lower", "target": 2.0,
                "file_mib": round(ours["file_bytes"] / 2**20, 1), "pickled_group_mib": round(ours["pickled_bytes"] / 2**20, 1),
                "ours_extra_mib": round(ours["extra_bytes"] / 2**20, 1),
                "baseline_extra_mib": round(base["extra_bytes"] / 2**20, 1), "cpu": cpu, "smoke": args.smoke,
            }), flush=True)


if __name__ == "__main__":
    main()
