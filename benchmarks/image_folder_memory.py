"""Issue #14's bar, measured: a 50,000-image folder at 224x224 trains with resident memory under
4 GiB.

1. Generates (resumably: files already there are kept) ``FOLDER/train/<class>/NNNNN.jpg``, 5,000
   per class, and ``FOLDER/test/<class>/``, 100 per class: real Fashion-MNIST images upscaled
   28 -> 224 (bicubic), tinted to RGB and given Gaussian noise so the JPEGs (quality 90) are
   photo-like in size (tens of KB, not the few KB of a flat upscale).
2. Streams that folder through the library's loader (``load_data("image_folder")``,
   ``make_batches``: Pillow in DataLoader workers, RandomResizedCrop + flip, normalisation
   computed on 500 sampled images) and trains a registry model (resnet18 at 224, batch 32) for
   ``--steps`` SGD steps, sampling the resident memory of the whole process tree (the trainer
   and its workers) every 0.5 s: RSS summed over processes (counts shared pages once per
   process, an upper bound) and PSS (shared pages split between the processes sharing them, the
   fair share of the machine's memory), with psutil when installed, else /proc.
3. Writes ``benchmarks/results/image_folder_memory.json`` and ``.md`` (partial figures every 25
   steps, ``complete: false`` until the last step; ``--deadline HH:MM`` stops early, recording
   what it measured, so a later session can rerun it to finish: generation resumes where it
   stopped, the measurement starts over).

    nice -n 10 .venv/bin/python benchmarks/image_folder_memory.py /var/tmp/fmnist224 --deadline 23:10
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "image_folder_memory"
CLASSES = 10
GiB = 1024 ** 3


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _past(deadline: datetime.datetime | None) -> bool:
    return deadline is not None and datetime.datetime.now() >= deadline


# ---- 1. the folder -----------------------------------------------------------------------------

def generate(folder: Path, per_class: int, test_per_class: int, size: int,
             deadline: datetime.datetime | None) -> dict:
    """Write the missing JPEGs; returns counts and bytes. Stops (incomplete) at ``deadline``."""
    from PIL import Image

    from clicktrain_deploy.data.datasets import fashion_mnist

    data = fashion_mnist()
    written = present = 0
    started = time.perf_counter()
    for split_name, split, count in (("test", data.test, test_per_class), ("train", data.train, per_class)):
        labels = split.labels.numpy()
        for label in range(CLASSES):
            target = folder / split_name / f"class{label}"
            target.mkdir(parents=True, exist_ok=True)
            have = {n for n in os.listdir(target) if n.endswith(".jpg")}
            index = np.flatnonzero(labels == label)
            for k in range(count):
                name = f"{k:05d}.jpg"
                if name in have:
                    present += 1
                    continue
                if _past(deadline):
                    return {"complete": False, "written": written, "present": present}
                i = int(index[k % len(index)])
                rng = np.random.default_rng([label, k, split_name == "train"])
                gray = np.asarray(Image.fromarray(split.images[i, 0].numpy()).resize(
                    (size, size), Image.BICUBIC), dtype=np.float32)
                tint = rng.uniform(0.55, 1.0, 3).astype(np.float32)
                pixels = gray[:, :, None] * tint + rng.uniform(0, 60, 3).astype(np.float32)
                pixels += rng.normal(0.0, 10.0, pixels.shape).astype(np.float32)
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
                tmp = target / f".{name}.tmp"
                image.save(tmp, "JPEG", quality=90)
                os.replace(tmp, target / name)  # only whole files count as present
                written += 1
                if written % 2000 == 0:
                    rate = written / (time.perf_counter() - started)
                    print(f"generated {written} (+{present} present), {rate:.0f} images/s", flush=True)
    return {"complete": True, "written": written, "present": present}


def folder_stats(folder: Path) -> dict:
    sizes = [e.stat().st_size for d in sorted((folder / "train").iterdir()) for e in os.scandir(d)
             if e.name.endswith(".jpg")]
    return {"train_images": len(sizes), "train_bytes": int(sum(sizes)),
            "mean_file_kb": sum(sizes) / len(sizes) / 1024 if sizes else 0.0}


# ---- memory sampling ---------------------------------------------------------------------------

def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _proc_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process from /proc (PSS 0 where smaps_rollup is missing)."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def tree_memory(pid: int) -> dict:
    """RSS and PSS summed over ``pid``'s process tree, and the number of processes."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        rss = pss = 0
        for p in procs:
            try:
                full = p.memory_full_info()
                rss += full.rss
                pss += getattr(full, "pss", 0)
            except psutil.Error:
                pass
        return {"rss": rss, "pss": pss, "processes": len(procs), "source": "psutil"}
    pids = _tree(pid)
    values = [_proc_memory(p) for p in pids]
    return {"rss": sum(v[0] for v in values), "pss": sum(v[1] for v in values),
            "processes": len(pids), "source": "/proc"}


class MemorySampler(threading.Thread):
    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"rss": 0, "pss": 0, "processes": 0}
        self.samples = 0
        self.source = ""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            m = tree_memory(os.getpid())
            self.source = m["source"]
            for key in ("rss", "pss", "processes"):
                self.peak[key] = max(self.peak[key], m[key])
            self.samples += 1
            self.stop.wait(self.interval)


# ---- 2. training -------------------------------------------------------------------------------

def write_results(result: dict, out: Path = RESULTS) -> None:
    from clicktrain_deploy.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), markdown(result))


def markdown(r: dict) -> str:
    t = r.get("training", {})
    lines = [
        "# Image folder memory (issue #14's bar: a 50,000-image folder at 224x224 under 4 GiB)",
        "",
        f"Measured {r['date']} on {r['cpu']} ({r['threads']} torch threads, {r['workers']} loader "
        f"workers, torch {r['torch']}), `nice -n 10` on a machine shared with other jobs; "
        f"{'complete' if r['complete'] else '**incomplete** (stopped at the deadline; rerun to finish)'}.",
        "",
        f"Folder: {r['folder']['train_images']:,} training JPEGs at {r['image_size']}x{r['image_size']} "
        f"({r['folder']['train_bytes'] / GiB:.2f} GiB on disk, {r['folder']['mean_file_kb']:.1f} KB per "
        f"file; Fashion-MNIST upscaled to RGB with noise), {r['classes']} classes. Model "
        f"`{r['model']}`, batch {r['batch_size']}, RandomResizedCrop + flip at {r['image_size']}, "
        "normalisation computed on 500 sampled images.",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    if t:
        lines += [
            f"| training steps | {t['steps']} |",
            f"| peak RSS, whole process tree (sum; shared pages counted per process) | "
            f"{t['peak_rss_bytes'] / GiB:.2f} GiB |",
            f"| peak PSS, whole process tree (shared pages split) | {t['peak_pss_bytes'] / GiB:.2f} GiB |",
            f"| processes (trainer + workers) | {t['peak_processes']} |",
            f"| peak RSS after loading the file list, before training | {t['rss_after_listing_bytes'] / GiB:.2f} GiB |",
            f"| training images/s (median over steps after warm-up) | {t['images_per_second']:.1f} |",
            f"| ms per step (median) | {t['median_step_ms']:.0f} |",
            f"| loader alone, images/s ({t['loader_batches']} batches, no training) | "
            f"{t['loader_images_per_second']:.1f} |",
            f"| bar: peak memory < 4 GiB | {'**met**' if t['peak_rss_bytes'] < 4 * GiB else 'not met'} |",
        ]
    lines += ["", f"Memory sampled every 0.5 s ({t.get('memory_source', '')}, {t.get('memory_samples', 0)} "
              "samples). Produced by `benchmarks/image_folder_memory.py`.", ""]
    return "\n".join(lines)


def measure(folder: Path, args, deadline: datetime.datetime | None, result: dict) -> None:
    import torch
    from torch import nn

    from clicktrain_deploy.data import load_data, make_batches
    from clicktrain_deploy.models import create_model

    torch.set_num_threads(args.threads)
    sampler = MemorySampler()
    sampler.start()
    data = load_data("image_folder", str(folder), image_size=args.size, workers=args.workers)
    mean, std = data.mean, data.std  # computed on 500 sampled images
    rss_listing = tree_memory(os.getpid())["rss"]
    batches = make_batches(data.train, args.batch, mean, std, train=True, seed=0, flip=True)
    # The loader alone: decode throughput with the given workers.
    started = time.perf_counter()
    count = 0
    for k, (inputs, _) in enumerate(batches.epoch(99, limit=args.loader_batches)):
        count += len(inputs)
    loader_rate = count / (time.perf_counter() - started)
    print(f"loader alone: {loader_rate:.1f} images/s", flush=True)

    model = create_model(args.model, len(data.classes), 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    step_ms: list[float] = []
    last = time.perf_counter()
    training = {}
    for step, (inputs, labels) in enumerate(batches.epoch(0, limit=args.steps)):
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        now = time.perf_counter()
        step_ms.append(1000 * (now - last))
        last = now
        done = step + 1
        stop = _past(deadline)
        if done % 25 == 0 or done == args.steps or stop:
            timed = step_ms[3:] or step_ms  # after warm-up
            median = statistics.median(timed)
            training = {
                "steps": done, "loss": float(loss.detach()),
                "peak_rss_bytes": sampler.peak["rss"], "peak_pss_bytes": sampler.peak["pss"],
                "peak_processes": sampler.peak["processes"], "rss_after_listing_bytes": rss_listing,
                "median_step_ms": median, "images_per_second": args.batch * 1000 / median,
                "loader_images_per_second": loader_rate, "loader_batches": args.loader_batches,
                "memory_source": sampler.source, "memory_samples": sampler.samples,
                "normalisation": {"mean": mean, "std": std},
            }
            result.update(training=training, complete=done >= args.steps)
            write_results(result, args.out)
            print(f"step {done}: loss {float(loss.detach()):.3f}, {median:.0f} ms/step, peak RSS "
                  f"{sampler.peak['rss'] / GiB:.2f} GiB, PSS {sampler.peak['pss'] / GiB:.2f} GiB", flush=True)
        if stop:
            break
    sampler.stop.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the image folder is (or is generated)")
    parser.add_argument("--per-class", type=int, default=5000, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=30)
    parser.add_argument("--deadline", help="HH:MM (local time, today): stop there, recording what was measured")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results path, without suffix")
    args = parser.parse_args(argv)
    deadline = None
    if args.deadline:
        hh, mm = map(int, args.deadline.split(":"))
        deadline = datetime.datetime.now().replace(hour=hh, minute=mm, second=0, microsecond=0)
    made = generate(args.folder, args.per_class, args.test_per_class, args.size, deadline)
    print(f"folder: {made}", flush=True)
    if not made["complete"]:
        print("deadline reached while generating; rerun to continue", flush=True)
        return 2
    if args.generate_only:
        return 0
    import torch

    result = {
        "date": datetime.date.today().isoformat(), "cpu": _cpu_name(), "cores": os.cpu_count(),
        "torch": torch.__version__, "python": sys.version.split()[0],
        "threads": args.threads, "workers": args.workers, "model": args.model,
        "batch_size": args.batch, "image_size": args.size, "classes": CLASSES,
        "folder": folder_stats(args.folder), "complete": False,
    }
    measure(args.folder, args, deadline, result)
    print(markdown(result))
    return 0 if result["complete"] else 2


if __name__ == "__main__":
    sys.exit(main())
