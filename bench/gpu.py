"""The GPU path end to end against the bare compiled encoder, in one run, with the local executor (no Ray).

    python -m bench.gpu [--images 4096] [--encoder clip-vit-l-336] [--batch 256] [--smoke]

1. Writes a corpus of real-size JPEGs (1024x768 and mixed sizes, WebDataset tars; ``bench/jpeg_corpus.py``).
2. Builds the encoder preset with random weights (``pretrained=null``, plain 576-token tiles unless ``--anyres``,
   bfloat16, ``torch.compile``) and a randomly initialised learned selector at the default width, saved as a
   real checkpoint.
3. Measures, in this one process:
   (a) the bare compiled encoder forward on the same images, preprocessed on the CPU and held on the GPU,
       micro-batches of ``--batch``; and the encoder plus selector the same way;
   (b) ``jobs.compress``'s path (read, decode, encode, select, write, commit, manifest) with the local
       executor and ``decode.device=cuda``: img/s from the first decode to the end of the run, so model
       loading and compilation (done before the first decode) are left out;
   (c) the same with ``decode.device=cpu``: every image decoded and resized by PIL on all cores;
   (d) each stage's busy time and span in (b) and (c) (``pipeline.timeline``);
   and how far the GPU-decoded tiles are from the CPU path's on the first 64 images.
4. Writes ``bench/results/gpu.json`` and the ``gpu`` section of ``docs/benchmarks.md``, naming the device.

``--smoke`` runs the same code on the CPU in about a minute: the tiny encoder, 32 images of 256x192, no
compile; it reports under ``ATR_BENCH_OUT`` (default: a folder in the system's temporary directory), never
over the recorded results.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench.common import (
    command_line,
    machine,
    section_text,
    today,
    update_doc,
    write_result,
)
from bench.jpeg_corpus import write_jpeg_corpus
from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, SelectorModelConfig, load_config
from pipeline.encoders import VisionEncoder, prepare_image
from pipeline.encoders.gpu_preprocess import prepare_images
from pipeline.selector import SelectorAutoencoder, select_tokens
from pipeline.selector.checkpoint import encoder_identity, save_checkpoint
from pipeline.sources import iter_shard, list_shards
from pipeline.sources.decode import decode_image
from pipeline.stages.encode_select import Models
from pipeline.stages.gpu_decode import decode_jpegs, jpeg_size_for_gpu, load_nvjpeg
from pipeline.stages.kept_tokens import per_image
from pipeline.timeline import recording

FIDELITY_IMAGES = 64
# Where --smoke reports, unless ATR_BENCH_OUT says otherwise: never the recorded results and page.
SMOKE_OUT = Path(tempfile.gettempdir()) / "atr-bench-gpu-smoke"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096, help="at least 2048; more dilutes pipeline fill and drain")
    parser.add_argument("--encoder", default="clip-vit-l-336")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5, help="selector.ratio: the kept fraction")
    parser.add_argument("--anyres", action="store_true", help="keep the preset's anyres tiling")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="bare-encoder timing rounds (best is kept)")
    parser.add_argument("--workdir", help="corpus and outputs (default: a temporary directory, on /dev/shm if "
                        "it has room)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, about a minute")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.encoder, args.batch, args.shard_size, args.no_compile = 32, "tiny", 8, 8, True
        os.environ.setdefault("ATR_BENCH_OUT", str(SMOKE_OUT))
    return args


def bench_config(args: argparse.Namespace, workdir: Path, *overrides: str) -> CompressConfig:
    device = "cpu" if args.smoke else "cuda"
    return load_config(CompressConfig, None, [
        f"encoder={args.encoder}", "encoder.pretrained=null", f"encoder.anyres={str(args.anyres).lower()}",
        f"encoder.batch_size={args.batch}", f"encoder.device={device}",
        f"encoder.dtype={'float32' if args.smoke else 'bfloat16'}",
        f"encoder.compile={str(not args.no_compile).lower()}",
        f"input.path={workdir / 'corpus'}", f"output.path={workdir / 'out'}", "executor=local",
        "selector.method=learned", f"selector.checkpoint={workdir / 'selector'}", "selector.mode=ratio",
        f"selector.ratio={args.ratio}", "output.dtype=float16", "progress_interval_s=30", *overrides,
    ])


def write_selector(cfg: CompressConfig, encoder: VisionEncoder, directory: Path) -> None:
    """A randomly initialised selector at the default width, saved as a checkpoint for this encoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SelectorAutoencoder(encoder.hidden_size, SelectorModelConfig())
    save_checkpoint(str(directory), model, step=0, metrics={}, train={"note": "random init, for benchmarks"},
                    encoder=encoder_identity(cfg.encoder, encoder.fingerprint(), encoder.hidden_size))


def _prepare_shard(job: tuple[Any, CompressConfig]) -> list[np.ndarray]:
    shard, cfg = job
    samples = iter_shard(shard, cfg.input, {})
    return [prepare_image(decode_image(sample.image, cfg.decode), cfg.encoder).tiles for sample in samples]


def prepared_tiles(cfg: CompressConfig) -> tuple[np.ndarray, int]:
    """Every image's tiles as the CPU path prepares them, [T, S, S, 3] uint8, and the number of images.

    Runs before any CUDA context exists, so the forked workers inherit none."""
    jobs = [(shard, cfg) for shard in list_shards(cfg.input, {})]
    with multiprocessing.get_context("fork").Pool() as pool:
        images = [tiles for shard in pool.map(_prepare_shard, jobs) for tiles in shard]
    return np.concatenate(images), len(images)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare_encoder(cfg: CompressConfig, encoder: VisionEncoder, host_tiles: np.ndarray, images: int,
                 repeats: int) -> dict[str, Any]:
    """(a) encoder alone, and encoder + selector + selection, over full micro-batches of tiles on the device."""
    tiles = torch.from_numpy(host_tiles).to(encoder.device)
    tiles_per_image = len(tiles) / images
    batch = cfg.encoder.batch_size
    chunks = [tiles[start : start + batch] for start in range(0, len(tiles) - batch + 1, batch)]
    selector = Models.around(encoder, cfg).selector

    def encoder_only() -> None:
        for chunk in chunks:
            encoder(chunk)

    def with_selector() -> None:
        for chunk in chunks:
            tokens, mask = per_image(encoder(chunk), [1] * len(chunk))
            select_tokens(selector.scores(tokens, mask, keys=[""] * len(chunk)), mask, cfg.selector)

    started = time.perf_counter()
    with_selector()  # compiles (fixed shape), warms the allocator and the selector
    synchronize(encoder.device)
    warm_up_s = time.perf_counter() - started
    results: dict[str, Any] = {"tiles": len(chunks) * batch, "batch": batch, "warm_up_s": round(warm_up_s, 2)}
    for name, run in (("encoder", encoder_only), ("encoder_selector", with_selector)):
        best = float("inf")
        for _ in range(repeats):
            synchronize(encoder.device)
            started = time.perf_counter()
            run()
            synchronize(encoder.device)
            best = min(best, time.perf_counter() - started)
        results[f"{name}_s"] = round(best, 4)
        results[f"{name}_img_per_s"] = round(len(chunks) * batch / best / tiles_per_image, 1)
    results["selector_share"] = round(1 - results["encoder_s"] / results["encoder_selector_s"], 4)
    return results


def end_to_end(cfg: CompressConfig) -> dict[str, Any]:
    """(b)/(c): one compress run; img/s over the window from the first decode to the run's end."""
    started = time.perf_counter()
    with recording() as timeline:
        summary = run_compress(cfg)
    ended = time.perf_counter()
    first_decode = min(s.start for s in timeline.spans if s.stage == "decode")
    window = ended - first_decode
    encodes = sorted((s for s in timeline.spans if s.stage == "encode"), key=lambda s: s.end)
    steady = sum(s.items for s in encodes[1:]) / (encodes[-1].end - encodes[0].end) if len(encodes) > 1 else None
    return {
        "images": summary["images"], "quarantined": summary["quarantined"],
        "kept_fraction": summary["kept_fraction"], "bytes_written": summary["bytes_written"],
        "setup_s": round(first_decode - started, 2), "window_s": round(window, 3),
        "img_per_s": round(summary["images"] / window, 1),
        "img_per_s_including_setup": round(summary["images"] / (ended - started), 1),
        "steady_img_per_s": round(steady, 1) if steady else None,  # between the first and the last batch encoded
        "stages": timeline.summary(origin=first_decode),
        "spans": [{"stage": s.stage, "thread": s.thread, "items": s.items,
                   "start_s": round(s.start - first_decode, 4), "end_s": round(s.end - first_decode, 4)}
                  for s in sorted(timeline.spans, key=lambda s: s.start)],
    }


def gpu_decode_fidelity(cfg: CompressConfig) -> dict[str, Any]:
    """GPU-decoded and GPU-resized tiles against the CPU path's, on the first JPEGs nvJPEG takes."""
    decoder, why_not = load_nvjpeg(torch.device(cfg.encoder.device))
    if decoder is None:
        return {"skipped": why_not}
    samples = []
    for shard in list_shards(cfg.input, {}):
        for sample in iter_shard(shard, cfg.input, {}):
            size = jpeg_size_for_gpu(sample.image, cfg.decode)
            if size is not None:
                samples.append((sample.image, size))
        if len(samples) >= FIDELITY_IMAGES:
            break
    samples = samples[:FIDELITY_IMAGES]
    images = decode_jpegs([data for data, _ in samples], [size for _, size in samples], decoder)
    on_gpu = prepare_images([image for image in images if image is not None], cfg.encoder)
    differences = []
    for (data, _), (tiles, _) in zip([s for s, i in zip(samples, images) if i is not None], on_gpu):
        reference = prepare_image(decode_image(data, cfg.decode), cfg.encoder).tiles.astype(np.int16)
        differences.append(np.abs(tiles.cpu().numpy().astype(np.int16) - reference))
    refused = sum(image is None for image in images)
    if not differences:
        return {"images": 0, "refused": refused}
    flat = np.concatenate([d.reshape(-1) for d in differences])
    return {"images": len(differences), "refused": refused, "max_abs": int(flat.max()),
            "mean_abs": round(float(flat.mean()), 4), "fraction_over_2_levels": round(float((flat > 2).mean()), 5)}


def scratch_root(images: int) -> str | None:
    """/dev/shm when it has room for the corpus and both runs' outputs (about 2 MB an image at most): the
    benchmark measures the pipeline, not this host's disk. None: the system's temporary directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > images * 2_000_000 + 2**30:
        return str(shm)
    return None


def third_party_imports() -> list[str]:
    top_level = {name.split(".")[0] for name, module in sys.modules.items()
                 if module is not None and not name.startswith("_")}
    return sorted(top_level - set(sys.stdlib_module_names) - {"bench", "pipeline", "jobs", "tests"})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    info = machine()
    results: dict[str, Any] = {
        "smoke": args.smoke, "torchvision": _version("torchvision"), "cpus_usable": len(os.sched_getaffinity(0)),
        "selector": {"method": "learned (random init)", "width": SelectorModelConfig().width, "mode": "ratio",
                     "ratio": args.ratio},
        "machine": info, "command": command_line(), "date": today(),
    }

    def measure(name: str, run: Callable[[], dict[str, Any]]) -> None:
        """One phase; a failure is recorded, not raised, and what is measured so far is saved each time."""
        try:
            results[name] = run()
        except Exception as exc:  # noqa: BLE001 - a one-off GPU run keeps the phases that worked
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results["total_s"] = round(time.perf_counter() - started, 1)
        write_result("gpu", results)
        log(f"{name}: {({k: v for k, v in results[name].items() if k not in ('spans', 'stages')})}")

    with tempfile.TemporaryDirectory(prefix="atr-bench-gpu-", dir=scratch_root(args.images)) as tmp:
        workdir = Path(args.workdir or tmp)
        results["workdir"] = str(workdir)
        for stale in ("corpus", "selector", "out-cuda", "out-cpu"):
            shutil.rmtree(workdir / stale, ignore_errors=True)
        base = (256, 192) if args.smoke else (1024, 768)
        results["corpus"] = write_jpeg_corpus(workdir / "corpus", args.images, args.shard_size, base=base)
        results["corpus"]["generate_s"] = round(time.perf_counter() - started, 2)
        cfg = bench_config(args, workdir)
        results["encoder"] = {"preset": args.encoder, "anyres": args.anyres, "batch": args.batch,
                              "dtype": cfg.encoder.dtype, "compile": cfg.encoder.compile,
                              "tokens_per_tile": cfg.encoder.tokens_per_tile}
        host_tiles, images = prepared_tiles(cfg)
        encoder = VisionEncoder.from_config(cfg.encoder)
        write_selector(cfg, encoder, workdir / "selector")
        measure("bare", functools.partial(bare_encoder, cfg, encoder, host_tiles, images, args.repeats))
        del encoder, host_tiles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for decode_device in ("cuda", "cpu"):
            run_cfg = dataclasses.replace(
                cfg, decode=dataclasses.replace(cfg.decode, device=decode_device),
                output=dataclasses.replace(cfg.output, path=str(workdir / f"out-{decode_device}")))
            measure(f"decode_{decode_device}", functools.partial(end_to_end, run_cfg))
        measure("gpu_decode_fidelity", functools.partial(gpu_decode_fidelity, cfg))

    bare = results["bare"].get("encoder_img_per_s")
    gpu, cpu = results["decode_cuda"].get("img_per_s"), results["decode_cpu"].get("img_per_s")
    if bare and gpu and cpu:
        results.update(
            e2e_gpu_decode_vs_bare_encoder=round(gpu / bare, 3), e2e_cpu_decode_vs_bare_encoder=round(cpu / bare, 3),
            gpu_decode_vs_cpu_decode=round(gpu / cpu, 3),
            targets={"e2e_at_least_1000_img_s": gpu >= 1000, "e2e_at_least_0.8_bare": gpu >= 0.8 * bare,
                     "gpu_decode_beats_cpu_decode": gpu > cpu},
        )
        title = f"GPU path (bench.gpu) on {info['gpu'] or 'no GPU: a CPU smoke run'}"
        update_doc("gpu", section_text("gpu", title, render_section(results), info, results["command"]))
    results.update(ray_imported="ray" in sys.modules, imported_packages=third_party_imports(),
                   total_s=round(time.perf_counter() - started, 1))
    write_result("gpu", results)
    headline = {k: results.get(k) for k in ("e2e_gpu_decode_vs_bare_encoder", "e2e_cpu_decode_vs_bare_encoder",
                                             "gpu_decode_vs_cpu_decode", "targets", "total_s")}
    print(json.dumps({"device": info["gpu"] or info["cpu"], **headline, "bare_img_per_s": bare,
                      "e2e_gpu_decode_img_per_s": gpu, "e2e_cpu_decode_img_per_s": cpu}))
    return results


def log(message: str) -> None:
    print(f"[bench.gpu] {message}", file=sys.stderr, flush=True)


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except Exception:  # noqa: BLE001 - not installed (or not importable beside this torch): say so
        return None


def render_section(r: dict[str, Any]) -> str:
    bare, gpu, cpu = r["bare"], r["decode_cuda"], r["decode_cpu"]
    enc = r["encoder"]
    corpus = r["corpus"]
    lines = [
        f"torchvision {r['torchvision'] or 'not installed'}. Encoder `{enc['preset']}` (random init, "
        f"{enc['tokens_per_tile']} tokens per image, {enc['dtype']}, compile={enc['compile']}, batch {enc['batch']}); "
        f"learned selector at width {r['selector']['width']} (random init), ratio {r['selector']['ratio']}; "
        "float16 Parquet output. Corpus: "
        f"{corpus['images']} JPEGs in {corpus['shards']} WebDataset shards, 3 in 4 of {corpus['base_size'][0]}x"
        f"{corpus['base_size'][1]}, the rest mixed sizes ({corpus['jpeg_bytes'] / corpus['images'] / 1e3:.0f} KB "
        f"each on average). Corpus and outputs in `{r['workdir']}`.",
        "",
        "| what | img/s | vs bare encoder |",
        "|---|---|---|",
        f"| (a) bare encoder forward, tiles already on the device | {bare['encoder_img_per_s']} | 1.00 |",
        f"| (a) encoder + selector + selection | {bare['encoder_selector_img_per_s']} | "
        f"{bare['encoder_selector_img_per_s'] / bare['encoder_img_per_s']:.2f} |",
        f"| (b) end to end, `decode.device=cuda` (nvJPEG) | {gpu['img_per_s']} | "
        f"{r['e2e_gpu_decode_vs_bare_encoder']:.2f} |",
        f"| (c) end to end, `decode.device=cpu` (PIL, all cores) | {cpu['img_per_s']} | "
        f"{r['e2e_cpu_decode_vs_bare_encoder']:.2f} |",
        "",
        f"End to end is read, decode, encode, select, write, commit and manifest, timed from the first decode to the "
        f"end of the run; model loading and compilation come before and are left out ({gpu['setup_s']} s and "
        f"{cpu['setup_s']} s of setup; with them: {gpu['img_per_s_including_setup']} and "
        f"{cpu['img_per_s_including_setup']} img/s; in steady state, from the first batch encoded to the last: "
        f"{gpu['steady_img_per_s']} and {cpu['steady_img_per_s']} img/s). The selector costs "
        f"{bare['selector_share']:.1%} of encoder + selector time. GPU decode vs CPU decode: "
        f"{r['gpu_decode_vs_cpu_decode']:.2f}x.",
        "",
        "(d) Where the time goes: each stage's busy seconds (summed over its threads) and its span in the window. "
        "encode only queues work on the GPU; gather waits for it, so the GPU's busy time shows in gather.",
        "",
        "| stage | (b) busy s | (b) span s | (c) busy s | (c) span s |",
        "|---|---|---|---|---|",
    ]
    for stage in ("decode", "stage", "encode", "gather", "write"):
        b, c = gpu["stages"].get(stage, {}), cpu["stages"].get(stage, {})
        lines.append(f"| {stage} | {b.get('busy_s', '-')} | {_span(b)} | {c.get('busy_s', '-')} | {_span(c)} |")
    fidelity = r["gpu_decode_fidelity"]
    lines += ["", "GPU-decoded tiles against the CPU path's (nvJPEG vs libjpeg-turbo, torch vs PIL resize): " + (
        f"max {fidelity['max_abs']} levels, mean {fidelity['mean_abs']}, "
        f"{fidelity['fraction_over_2_levels']:.3%} of values over 2 levels ({fidelity['images']} images)."
        if "max_abs" in fidelity else f"not measured ({json.dumps(fidelity)})."), ""]
    targets = r["targets"]
    lines += [
        "Targets (issue 11): end to end >= 1,000 img/s: " + _mark(targets["e2e_at_least_1000_img_s"])
        + "; >= 0.8 x bare encoder: " + _mark(targets["e2e_at_least_0.8_bare"])
        + "; GPU decode beats CPU decode: " + _mark(targets["gpu_decode_beats_cpu_decode"]) + ".",
        "",
    ]
    return "\n".join(lines)


def _span(stage: dict[str, Any]) -> str:
    return f"{stage['first_start_s']}-{stage['last_end_s']}" if stage else "-"


def _mark(met: bool) -> str:
    return "met" if met else "not met"


if __name__ == "__main__":
    main()
