"""Memory of a 1,000,000-entry JSON index in DataLoader workers (data_loader.CaptionIndex).

    .venv/bin/python bench/bench_index_memory.py                       # 1,000,000 entries; updates bench/README.md
    .venv/bin/python bench/bench_index_memory.py --entries 100000 --no_readme      # a quick look

The index names N distinct image files, each with two captions of about 50 characters. The files
are 1,000 to a folder, each folder one 8x8 PNG and 999 hard links to it (a directory entry each, no
data blocks), so that load_caption_index checks that every image exists as it does for real ones. Each form is measured in a
fresh process: load the index, then iterate it with a DataLoader of 2 workers that reads every
image name and every caption (what TrainDataset touches besides the image file; images are not
decoded, that cost does not depend on the index). While it iterates, the parent samples
/proc/<pid>/smaps_rollup of each worker; the table shows the largest value seen:
USS = Private_Clean + Private_Dirty, the memory the worker alone holds (pages it has copied from
the parent, plus its own allocations); PSS adds its share of the pages still shared. The forms:
  baseline  the same DataLoader over a dataset that holds no strings;
  index     data_loader.load_caption_index: names and captions packed into numpy buffers;
  naive     the entries as json.load returns them, a list of dicts, read the same way.
"""
import argparse
import json
import os
import platform
import resource
import sys
import textwrap
import time
from pathlib import Path

import common

BENCH, REPO = common.BENCH, common.REPO
HEADING = "## bench_index_memory.py"
FORMS = ("baseline", "index", "naive")


def build(folder: Path, entries: int):
    """data.json with `entries` images (hard links to a few PNGs) of two captions each; kept for reruns."""
    index = folder / "data.json"
    if index.exists() and json.loads((folder / "built.json").read_text())["entries"] == entries:
        return index
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    colours, shapes = ("red", "green", "blue", "yellow", "purple"), ("circle", "square", "triangle", "star")
    with open(index, "w", encoding="utf-8") as f:
        f.write("[\n")
        for k in range(entries):
            name = f"images/{k // 1000:04d}/{k:07d}.png"
            if k % 1000 == 0:  # a real file per folder: a file system allows ~65,000 links to one file
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                placeholder = folder / name
                Image.new("RGB", (8, 8), (200, 30, 30)).save(placeholder)
            elif not (folder / name).exists():
                os.link(placeholder, folder / name)
            colour, shape = colours[k % 5], shapes[k // 5 % 4]
            captions = [f"photo {k}: a {colour} {shape} on the left of a grey background",
                        f"a small {colour} {shape}, picture number {k} of the set"]
            f.write(json.dumps({"image_path": name, "captions": captions}) + (",\n" if k < entries - 1 else "\n"))
        f.write("]\n")
    (folder / "built.json").write_text(json.dumps({"entries": entries}))
    return index


class ReadIndex:
    """Item i: every caption and the name of image i of a CaptionIndex (their total length)."""

    def __init__(self, index):
        self.index = index

    def __len__(self):
        return self.index.num_images

    def __getitem__(self, i):
        captions = [self.index.caption(int(j)) for j in self.index.captions_of(i)]
        return len(self.index.image_name(i)) + sum(map(len, captions))


class ReadEntries:
    """The same from the list of dicts json.load returns."""

    def __init__(self, entries, root):
        self.entries, self.root = entries, root

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        entry = self.entries[i]
        return len(os.path.join(self.root, entry["image_path"])) + sum(map(len, entry["captions"]))


class ReadNothing:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i % 7


def memory_kib(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0])
    return {"uss": fields["Private_Clean"] + fields["Private_Dirty"], "pss": fields["Pss"], "rss": fields["Rss"]}


def worker(form: str, index_path: str, entries: int, workers: int, batch_size: int):
    """Runs in the measured process: load, iterate with a DataLoader, print the measurements."""
    from torch.utils.data import DataLoader
    sys.path.insert(0, str(REPO))
    import data_loader
    started, arrays = time.perf_counter(), 0
    if form == "index":
        dataset = ReadIndex(data_loader.load_caption_index(index_path))
        strings = (dataset.index._names, dataset.index._captions)
        arrays = sum(a.nbytes for a in (dataset.index._first_caption, dataset.index.caption_image,
                                         *(p.buffer for p in strings), *(p.offsets for p in strings)))
    elif form == "naive":
        with open(index_path, encoding="utf-8") as f:
            dataset = ReadEntries(json.load(f), os.path.dirname(index_path))
    else:
        dataset = ReadNothing(entries)
    loaded = time.perf_counter() - started
    after_load = memory_kib(os.getpid())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=True,
                        collate_fn=sum)
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    peak, total, started = {}, 0, time.perf_counter()
    for b, batch in enumerate(loader):
        total += batch
        if b % 20 == 0 or b == len(loader) - 1:
            for pid in map(int, children.read_text().split()):
                now = memory_kib(pid)
                peak[pid] = {k: max(v, peak.get(pid, {}).get(k, 0)) for k, v in now.items()}
    print(json.dumps({"form": form, "load_s": loaded, "arrays_mib": arrays / 2**20, "iterate_s": time.perf_counter() - started,
                      "chars_read": total, "main_after_load": after_load, "main_after": memory_kib(os.getpid()),
                      "main_peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "workers": list(peak.values())}))


def measure(form, index, entries, workers, batch_size) -> dict:
    import subprocess
    done = subprocess.run([sys.executable, __file__, "--worker", form, "--index", str(index),
                           "--entries", str(entries), "--workers", str(workers), "--batch_size", str(batch_size)],
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def table(rows) -> str:
    mib = 1024
    lines = ["| form | load (s) | iterate (s) | main RSS after load (MiB) | main peak RSS (MiB) | "
             "worker USS (MiB) | worker PSS (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        uss = " / ".join(f"{w['uss'] / mib:,.0f}" for w in r["workers"])
        pss = " / ".join(f"{w['pss'] / mib:,.0f}" for w in r["workers"])
        lines.append(f"| {r['form']} | {r['load_s']:.1f} | {r['iterate_s']:.1f} | "
                     f"{r['main_after_load']['rss'] / mib:,.0f} | {r['main_peak_rss_kib'] / mib:,.0f} | {uss} | {pss} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="images in the JSON index")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--batch_size", type=int, default=1000, help="items per DataLoader batch")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="forms to measure")
    parser.add_argument("--out_dir", default=str(BENCH / "out" / "index_memory"),
                        help="where the index and its image links go (kept for reruns; bench/out/ is not in git)")
    parser.add_argument("--no_readme", action="store_true", help="print the table only")
    parser.add_argument("--worker", choices=FORMS, help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.index, args.entries, args.workers, args.batch_size)

    started = time.perf_counter()
    index = build(Path(args.out_dir) / f"N{args.entries}", args.entries)
    print(f"index {index} ({index.stat().st_size / 2**20:,.0f} MiB) ready in {time.perf_counter() - started:.0f} s",
          flush=True)
    load_before, rows = os.getloadavg(), []
    for form in args.forms:
        rows.append(measure(form, index, args.entries, args.workers, args.batch_size))
        print(f"{form}: {rows[-1]['chars_read']:,} characters read", flush=True)
    result = table(rows)
    print(result)
    if args.no_readme:
        return
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    by_form = {r["form"]: r for r in rows}

    def above_baseline(form):
        return max(w["uss"] for w in by_form[form]["workers"]) / 1024 - max(
            w["uss"] for w in by_form["baseline"]["workers"]) / 1024
    notes = []
    if {"baseline", "index"} <= by_form.keys():
        index = by_form["index"]
        notes.append(f"With the index, each worker holds {round(above_baseline('index')):,} MiB more private "
                     f"memory than the baseline worker: names and captions are "
                     f"{index['arrays_mib']:,.0f} MiB of numpy arrays in the parent (utf-8 bytes plus "
                     f"offsets), which the forked workers only read, so the pages stay shared. PSS shows "
                     f"each worker's share of them.")
        notes.append(f"Loading is the costly moment, in the parent: the peak is "
                     f"{(index['main_peak_rss_kib'] - by_form['baseline']['main_peak_rss_kib']) / 1024:,.0f} MiB "
                     f"above the baseline (json.load's Python objects, then packing), and RSS stays "
                     f"{(index['main_after_load']['rss'] - by_form['baseline']['main_after_load']['rss']) / 1024:,.0f} "
                     f"MiB above it afterwards (the arrays plus memory the allocator keeps). Under torchrun "
                     f"every process loads the index, so count that peak once per GPU.")
    if {"baseline", "naive"} <= by_form.keys():
        notes.append(f"The list of dicts costs each worker {round(above_baseline('naive')):,} MiB more than the "
                     f"baseline: reading an object writes its reference count, so the worker copies the "
                     f"page holding it (copy-on-write) and ends with its own copy of everything it read.")
    notes = "\n".join(textwrap.fill(note, 100, initial_indent="- ", subsequent_indent="  ") for note in notes)
    common.write_readme(HEADING, f"""{HEADING}

A JSON index of {args.entries:,} images with two captions each, loaded and then read in full (every
image name and caption) by a DataLoader of {args.workers} worker processes (fork), {args.batch_size} items per
batch; each form in a fresh process. Worker columns: the largest value seen while iterating, one
per worker. USS is the worker's private memory (Private_Clean + Private_Dirty of
/proc/PID/smaps_rollup); PSS adds its share of the pages it still shares with the parent.
"baseline" iterates a dataset without strings; "index" is `data_loader.load_caption_index` (a
CaptionIndex); "naive" is the list of dicts `json.load` returns. Machine: {os.cpu_count()} cores
({cpu}), torch {torch.__version__}, Python {platform.python_version()}; load average {load_before[0]:.1f} before and
{os.getloadavg()[0]:.1f} after (other jobs shared the cores: times are noisy). Rerun:
`.venv/bin/python bench/bench_index_memory.py`.

{result}

{notes}
""")


if __name__ == "__main__":
    main()
