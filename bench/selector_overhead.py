"""Selector overhead: what the learned selector adds to the encoder, in FLOPs and in CPU time.

``python -m bench.selector_overhead [--rounds R] [--time-vitl/--no-time-vitl]``

Dimensions: ``tiny`` and ``vit-b-16`` (196 tokens), ``clip-vit-l-336`` plain (576 tokens) and anyres (5 tiles,
2880 tokens, selected together). The selector is a random-init ``SelectorAutoencoder(...).selector`` at
``SelectorModelConfig``'s default width; at inference only it runs (keep probability, then ``select_tokens``).

* **FLOPs** (``torch.utils.flop_counter.FlopCounterMode``) per image, counted on the meta device, so ViT-L
  needs no weights; the encoder runs exactly ``VisionEncoder``'s code (embeddings and the layers up to
  ``select_layer``). On CPU tensors SDPA's fused kernel is invisible to the counter; on meta it is counted.
  A width sweep shows the widest selector that stays within the target.
* **Time**: ``VisionEncoder.forward`` on one batch and the selector + ``select_tokens`` on its features,
  interleaved, medians over rounds (CPU, float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import machine, markdown_table, median, report
from pipeline.config import (
    CONF_DIR,
    EncoderConfig,
    SelectorConfig,
    SelectorModelConfig,
    load_config,
)
from pipeline.encoders import VisionEncoder
from pipeline.selector import SelectorAutoencoder, select_tokens
from pipeline.selector.learned import ROUND_FRACTIONS

TARGET = 0.03
WIDTH_SWEEP = (64, 128, 192, 256, 384, 512)
SELECTION = SelectorConfig(method="learned", checkpoint="unused", mode="threshold", threshold=0.5)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    preset: str
    tiles: int  # tiles per image: 1 plain, 5 for LLaVA-NeXT's anyres at its largest pinpoint
    time_batch: int  # images per timed batch


SETTINGS = (
    Setting("tiny", "tiny", 1, 16),
    Setting("vit-b-16", "vit-b-16", 1, 8),
    Setting("vit-l-14-336", "clip-vit-l-336", 1, 1),
    Setting("vit-l-14-336-anyres", "clip-vit-l-336", 5, 1),
)


def encoder_config(preset: str) -> EncoderConfig:
    return load_config(EncoderConfig, str(CONF_DIR / "encoder" / f"{preset}.yaml"),
                       ["pretrained=null", "anyres=false", "device=cpu", "dtype=float32"])


def meta_encoder(cfg: EncoderConfig) -> VisionEncoder:
    """The encoder's modules on the meta device: shapes without weights (and so nothing to fingerprint)."""
    with torch.device("meta"), mock.patch("pipeline.encoders.tower.weights_fingerprint", return_value="meta"):
        return VisionEncoder.from_config(dataclasses.replace(cfg, device="meta"))


def selector_model(dim: int, width: int, device: str) -> torch.nn.Module:
    cfg = SelectorModelConfig(width=width)
    with torch.device(device):
        return SelectorAutoencoder(dim, cfg).selector.eval()


def count_flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def select(selector: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return select_tokens(selector.keep_probability(tokens, mask), mask, SELECTION)


def set_aware_extra_flops(dim: int, width: int, tokens: torch.Tensor) -> int:
    """What ``method=learned`` (set-aware rounds) adds to the one-shot selector: one reconstructor pass per round
    and the cosine-distance matrix of the max-min term, counted on the meta device. The picks themselves are
    elementwise (a max over N per pick) and not counted: under 0.7·N² operations."""
    with torch.device("meta"):
        reconstructor = SelectorAutoencoder(dim, SelectorModelConfig(width=width)).reconstructor.eval()
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device="meta")
    per_round = count_flops(lambda: reconstructor(tokens, mask, mask))
    distance = count_flops(lambda: tokens @ tokens.transpose(1, 2))
    return len(ROUND_FRACTIONS) * per_round + distance


def flops_per_image(setting: Setting, cfg: EncoderConfig, widths: tuple[int, ...]) -> dict[str, Any]:
    encoder = meta_encoder(cfg)
    pixels = torch.empty(setting.tiles, cfg.image_size, cfg.image_size, 3, dtype=torch.uint8, device="meta")
    with torch.inference_mode():
        encoder_flops = count_flops(lambda: encoder(pixels))
        tokens = torch.empty(1, setting.tiles * encoder.tokens_per_tile, encoder.hidden_size, device="meta")
        selector_flops = {width: count_flops(lambda: select(selector_model(encoder.hidden_size, width, "meta"), tokens))
                          for width in widths}
        width = SelectorModelConfig().width
        set_aware = selector_flops[width] + set_aware_extra_flops(encoder.hidden_size, width, tokens)
    return {"tokens": tokens.shape[1], "dim": encoder.hidden_size, "encoder_gflops": encoder_flops / 1e9,
            "selector_gflops_by_width": {w: f / 1e9 for w, f in selector_flops.items()},
            "flops_ratio_by_width": {w: f / encoder_flops for w, f in selector_flops.items()},
            "set_aware_gflops": set_aware / 1e9, "set_aware_flops_ratio": set_aware / encoder_flops}


def time_per_image(setting: Setting, cfg: EncoderConfig, width: int, rounds: int) -> dict[str, float]:
    encoder = VisionEncoder.from_config(cfg)
    selector = selector_model(encoder.hidden_size, width, "cpu")
    pixels = torch.randint(0, 256, (setting.time_batch * setting.tiles, cfg.image_size, cfg.image_size, 3),
                           dtype=torch.uint8)
    with torch.inference_mode():
        tokens = encoder(pixels).reshape(setting.time_batch, -1, encoder.hidden_size)  # warm-up and the features
        select(selector, tokens)
        encoder_s, selector_s = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            encoder(pixels)
            middle = time.perf_counter()
            select(selector, tokens)
            encoder_s.append(middle - start)
            selector_s.append(time.perf_counter() - middle)
    per_image = setting.time_batch
    return {"encoder_ms": 1e3 * median(encoder_s) / per_image, "selector_ms": 1e3 * median(selector_s) / per_image,
            "time_ratio": median([s / e for s, e in zip(selector_s, encoder_s)])}


def markdown(result: dict[str, Any]) -> str:
    width = result["selector_width"]
    rows = []
    for name, r in result["settings"].items():
        timing = r.get("time")
        rows.append([name, r["tokens"], r["dim"], f"{r['encoder_gflops']:.1f}",
                     f"{r['selector_gflops_by_width'][width]:.2f}", f"**{100 * r['flops_ratio_by_width'][width]:.2f}%**",
                     f"{timing['encoder_ms']:.0f}" if timing else "–", f"{timing['selector_ms']:.1f}" if timing else "–",
                     f"{100 * timing['time_ratio']:.1f}%" if timing else "not timed"])
    table = markdown_table(["setting", "tokens", "dim", "encoder GFLOPs/img", "selector GFLOPs/img",
                            "selector / encoder FLOPs", "encoder ms/img (CPU)", "selector ms/img (CPU)",
                            "selector / encoder time"], rows)
    set_aware = markdown_table(
        ["setting", "one-shot (learned_oneshot) / encoder", "set-aware (learned) GFLOPs/img", "set-aware / encoder"],
        [[name, f"{100 * r['flops_ratio_by_width'][width]:.2f}%", f"{r['set_aware_gflops']:.2f}",
          f"**{100 * r['set_aware_flops_ratio']:.2f}%**"] for name, r in result["settings"].items()])
    set_aware_met = "met" if result["set_aware_flops_ratio_vitl336"] <= TARGET else "not met"
    anyres = result["settings"]["vit-l-14-336-anyres"]
    anyres_set_aware = anyres["set_aware_flops_ratio"]
    sweep = markdown_table(
        ["selector width", *map(str, WIDTH_SWEEP)],
        [[name, *(f"{100 * result['settings'][name]['flops_ratio_by_width'][w]:.2f}%" for w in WIDTH_SWEEP)]
         for name in ("vit-l-14-336", "vit-l-14-336-anyres")])
    met = "met" if result["selector_flops_ratio_vitl336"] <= TARGET else "not met"
    return (f"Selector at `SelectorModelConfig` defaults (width {width}, {SelectorModelConfig().selector_layers} "
            f"layers, {SelectorModelConfig().num_heads} heads), random init; encoders at preset dimensions, random "
            f"init, `select_layer=-2` (the last layer is not run). FLOPs counted with `FlopCounterMode` on the meta "
            f"device (one image); times on CPU, float32, medians of {result['rounds']} rounds.\n\n{table}\n\n"
            f"FLOP share by selector width (ViT-L/14-336):\n\n{sweep}\n\n"
            f"Target: selector FLOPs ≤ {100 * TARGET:.0f}% of the ViT-L/14-336 encoder's at the default width — "
            f"**{met}** ({100 * result['selector_flops_ratio_vitl336']:.2f}% plain, "
            f"{100 * anyres['flops_ratio_by_width'][width]:.2f}% anyres). Widest width within target at anyres: "
            f"{result['widest_width_within_target_anyres']} (of {', '.join(map(str, WIDTH_SWEEP))}).\n\n"
            f"Set-aware selection (`selector.method=learned`: the selector, then {len(ROUND_FRACTIONS)} reconstructor "
            f"rounds and the max-min distance matrix) at width {width}:\n\n{set_aware}\n\n"
            f"Target ≤ {100 * TARGET:.0f}% of ViT-L/14-336: **{set_aware_met}** "
            f"({100 * result['set_aware_flops_ratio_vitl336']:.2f}% plain, "
            f"{100 * anyres_set_aware:.2f}% anyres).\n")


def run(rounds: int, time_vitl: bool) -> dict[str, Any]:
    info = machine()
    width = SelectorModelConfig().width
    settings: dict[str, Any] = {}
    for setting in SETTINGS:
        cfg = encoder_config(setting.preset)
        widths = tuple(sorted({width, *WIDTH_SWEEP}))
        result = flops_per_image(setting, cfg, widths)
        if rounds and (time_vitl or not setting.preset.startswith("clip-vit-l")):
            result["time"] = time_per_image(setting, cfg, width, rounds)
        settings[setting.name] = result
    anyres = settings["vit-l-14-336-anyres"]["flops_ratio_by_width"]
    result = {
        "selector_width": width, "rounds": rounds, "settings": settings, "target": TARGET,
        "selector_flops_ratio_vitl336": settings["vit-l-14-336"]["flops_ratio_by_width"][width],
        "selector_flops_ratio_vitl336_anyres": anyres[width],
        "set_aware_flops_ratio_vitl336": settings["vit-l-14-336"]["set_aware_flops_ratio"],
        "set_aware_flops_ratio_vitl336_anyres": settings["vit-l-14-336-anyres"]["set_aware_flops_ratio"],
        "widest_width_within_target_anyres": max((w for w, r in anyres.items() if r <= TARGET), default=None),
    }
    report("selector_overhead", "Selector overhead (bench.selector_overhead)", markdown(result), result, info)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.selector_overhead")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per setting; 0 counts FLOPs only")
    parser.add_argument("--time-vitl", action=argparse.BooleanOptionalAction, default=True,
                        help="also time ViT-L/14-336 on CPU (slow: about 0.4 TFLOP per tile)")
    args = parser.parse_args()
    run(args.rounds, args.time_vitl)


if __name__ == "__main__":
    main()
