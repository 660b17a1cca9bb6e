"""Does the set-aware selection win only by its own judge? Recon error of each method judged by two independently
trained reconstructors (one trained on the demo corpus, one on real pages) and by a training-free judge that fills
each dropped token with its most similar kept token (cosine), on the same held-out images.

``python -m bench.selection_judges DEMO_CKPT REAL_CKPT HELDOUT MAX_IMAGES`` (markdown to stdout, JSON to ``OUT``,
default ``selection_judges.json``)

``learned[X]`` / ``oneshot[X]`` are the set-aware and one-shot selections of checkpoint X.
"""
import json
import sys

import numpy as np
import torch

from pipeline.config import CONF_DIR, SelectorConfig, load_config
from pipeline.encoders import VisionEncoder
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.runner import ground_truth, method_scores
from pipeline.evaluation.samples import batched, encode_batch, iter_labelled_images
from pipeline.selector import load_checkpoint, select_tokens
from pipeline.selector.baselines import diversity_ranks
from pipeline.selector.learned import LearnedSelector
from pipeline.selector.loss import reconstruction_error
from pipeline.selector.model import normalize_tokens


def nearest_kept_error(tokens, mask, keep):
    """The training-free judge: each dropped token filled in by its most cosine-similar kept token."""
    t = normalize_tokens(tokens)
    u = torch.nn.functional.normalize(tokens.float(), dim=-1)
    sim = (u @ u.transpose(1, 2)).masked_fill(~keep[:, None, :], -2)
    filled = torch.gather(t, 1, sim.argmax(-1)[..., None].expand_as(t))
    err = (filled - t).pow(2).mean(-1).masked_fill(~mask, 0)
    return err.sum(1) / mask.sum(1)


def main() -> None:
    demo, real, inp, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = load_config(EvaluateConfig, str(CONF_DIR / "evaluate.yaml"), [f"selector.checkpoint={demo}"])
    enc = VisionEncoder.from_config(cfg.encoder)
    cks = {"demo": load_checkpoint(demo), "real": load_checkpoint(real)}
    sels = {k: LearnedSelector(c, "cpu") for k, c in cks.items()}
    judges = {k: c.model.eval() for k, c in cks.items()}
    ic = load_config(EvaluateConfig, None, [f"input.path={inp}"]).input
    acc = {}
    torch.set_num_threads(1)
    with torch.inference_mode():
      for images in batched(iter_labelled_images(ic, cfg.decode, {}, limit), 32):
        b = encode_batch(enc, images); tr = ground_truth(images, b, cfg)
        tokens, mask = b.tokens, b.mask
        def rs(r): return (1 - r.double()/mask.sum(1,keepdim=True)).float().masked_fill(~mask, float('-inf'))
        scores = {"learned[demo]": rs(sels["demo"].picking_order(tokens, mask)), "learned[real]": rs(sels["real"].picking_order(tokens, mask)),
                  "oneshot[demo]": sels["demo"].keep_probability(tokens, mask), "oneshot[real]": sels["real"].keep_probability(tokens, mask),
                  "diversity": rs(diversity_ranks(tokens, mask)), "oracle": method_scores("oracle", {}, images, b, tr, torch.device("cpu"))}
        for m, sc in scores.items():
            for ratio in (0.1, 0.3, 0.5):
                keep = select_tokens(sc, mask, SelectorConfig(mode="ratio", ratio=ratio, min_tokens=1))
                d = acc.setdefault((m, ratio), {"judge_demo": [], "judge_real": [], "nearest_kept": []})
                d["judge_demo"] += reconstruction_error(judges["demo"].reconstruct(tokens, mask, keep), tokens, mask).tolist()
                d["judge_real"] += reconstruction_error(judges["real"].reconstruct(tokens, mask, keep), tokens, mask).tolist()
                d["nearest_kept"] += nearest_kept_error(tokens, mask, keep).tolist()
    print("| method | keep | judge: demo-trained reconstructor | judge: real-trained reconstructor | judge-free: nearest kept token |")
    print("|---|---|---|---|---|")
    out = {}
    for (m, ratio), d in acc.items():
        out[f"{m}@{ratio}"] = {k: float(np.mean(v)) for k, v in d.items()}
        print(f"| {m} | {ratio} | " + " | ".join(f"{np.mean(d[k]):.4f}" for k in ("judge_demo","judge_real","nearest_kept")) + " |")
    json.dump(out, open(sys.argv[5] if len(sys.argv) > 5 else "selection_judges.json", "w"), indent=1)


if __name__ == "__main__":
    main()
