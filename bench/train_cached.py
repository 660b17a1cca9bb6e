"""Train a selector in one process on cached encoder tokens: the same loop, model and train config as
``jobs.train_selector`` (``pipeline/conf/train_selector.yaml``), without Ray, for studies on a busy machine.

``python -m bench.train_cached --input TRAIN_IMAGES --out CHECKPOINT_ROOT [--steps 300] [key=value ...]``

Every image is encoded once (the tiny encoder) and the token sets are sampled by ``sample_batches``; the
checkpoint is written with ``save_checkpoint`` and loads like any other (``selector.checkpoint=OUT``).
"""

from __future__ import annotations

import argparse
import json

import torch

from pipeline.config import CONF_DIR, TrainSelectorConfig, load_config
from pipeline.encoders import VisionEncoder
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.samples import batched, iter_labelled_images
from pipeline.selector.checkpoint import checkpoint_dir, encoder_identity, save_checkpoint
from pipeline.selector.model import SelectorAutoencoder
from pipeline.selector.training import sample_batches, train_loop


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_cached")
    parser.add_argument("--input", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(TrainSelectorConfig, str(CONF_DIR / "train_selector.yaml"), [f"input.path={args.input}", *args.overrides])
    encoder = VisionEncoder.from_config(cfg.encoder)
    input_cfg = load_config(EvaluateConfig, None, [f"input.path={args.input}"]).input
    token_sets = []
    for images in batched(iter_labelled_images(input_cfg, cfg.decode, {}, None), 32):
        token_sets += [e.tokens for e in encoder.encode_images([item.image for item in images])]
    torch.manual_seed(cfg.train.seed)
    model = SelectorAutoencoder(encoder.hidden_size, cfg.model)
    metrics = train_loop(model, sample_batches(token_sets, cfg.train.batch_size, cfg.train.seed), cfg.train,
                         on_log=lambda m: print(json.dumps(m), flush=True))
    path = save_checkpoint(checkpoint_dir(args.out, cfg.train.steps), model, step=cfg.train.steps,
                           encoder=encoder_identity(cfg.encoder, encoder.fingerprint(), encoder.hidden_size),
                           train={"steps": cfg.train.steps, "images": len(token_sets), "cached_tokens": True},
                           metrics=metrics)
    print(json.dumps({"checkpoint": path, "images": len(token_sets), **metrics}))


if __name__ == "__main__":
    main()
