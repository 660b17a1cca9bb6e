"""Feed pruned image tokens to a LLaVA-NeXT (or LLaVA-OneVision) language model; no vision tower runs.

The stored tokens are the vision tower's selected-layer features, so the model's ``multi_modal_projector`` maps
them to the text width, as in ``get_image_features``. What changes is the image section of the sequence: it
holds one position per *kept* token (plus ``image_newline`` slots), so samples differ in length.

Order of a sample's image section (:func:`image_layout`), following ``pack_image_features``:
- plain (``grid == (0, 0)``, one tile): the kept tokens in row-major order, then one newline;
- anyres: the base tile's kept tokens in row-major order (no newlines), then the high-res tiles as one large
  ``rows*side x cols*side`` canvas (tile ``1 + r*cols + c`` covers canvas rows ``r*side ...``, columns
  ``c*side ...``), read row by row across tiles, with a newline after each canvas row that kept a token.
A canvas row with no kept token gets no newline: dropping it is what LLaVA-NeXT's unpadding does to padded rows.
Not reproduced: the unpad crop itself (the selector decides what survives) and LLaVA-OneVision's
``anyres_max`` down-interpolation of large canvases (a sparse token set cannot be interpolated).
Models without ``image_newline`` (plain LLaVA) get the kept tokens only.

Text side (:func:`tokenize_prompts`): ``prompt`` holds one ``<image>`` placeholder, expanded to the sample's
image length; the caption follows as the target, ending with EOS. Labels are -100 on prompt, image and padding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.loader.collate import pad_collate
from pipeline.output.format import SCALES_COLUMN, dequantize
from pipeline.vlm.config import DEFAULT_PROMPT, IMAGE_PLACEHOLDER

NEWLINE = -1  # layout slot that holds model.image_newline
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------- image layout


def image_layout(positions: Tensor, grid: Sequence[int], side: int, newline: bool = True) -> Tensor:
    """The image section as indices into the kept tokens (``NEWLINE`` for a newline slot), in the model's order.

    ``positions`` are the kept tokens' flat indices into the image's full token sequence (tile-major, then
    row-major inside a tile); ``grid`` is ``(rows, cols)`` of the high-res tiles, ``(0, 0)`` for a plain image.
    """
    positions = positions.long().cpu()  # many tiny ops: cheaper on the host than as device kernels
    per_tile = side * side
    rows, cols = int(grid[0]), int(grid[1])
    tiles = 1 + rows * cols if rows * cols else 1
    if positions.numel() and (positions.min() < 0 or positions.max() >= tiles * per_tile):
        raise ValueError(
            f"kept positions span [{int(positions.min())}, {int(positions.max())}], outside the "
            f"{tiles} tile(s) of {side}x{side} tokens that grid {rows}x{cols} describes"
        )
    if tiles == 1:
        order = torch.argsort(positions)
        return torch.cat([order, torch.full((1,), NEWLINE)]) if newline else order

    tile = positions // per_tile
    base = torch.nonzero(tile == 0).flatten()
    base = base[torch.argsort(positions[base])]
    high = torch.nonzero(tile > 0).flatten()
    grid_row, grid_col = (tile[high] - 1) // cols, (tile[high] - 1) % cols
    canvas_row = grid_row * side + (positions[high] % per_tile) // side
    canvas_col = grid_col * side + positions[high] % side
    order = torch.argsort(canvas_row * (cols * side) + canvas_col)
    high, canvas_row = high[order], canvas_row[order]
    if not newline or high.numel() == 0:
        return torch.cat([base, high])
    row_ends = torch.ones_like(high, dtype=torch.bool)
    row_ends[:-1] = canvas_row[1:] != canvas_row[:-1]
    # Each token moves right by the number of newlines (row ends) before it; each newline follows its row's end.
    token_slots = torch.arange(high.numel()) + torch.cumsum(row_ends.long(), 0) - row_ends.long()
    section = torch.full((high.numel() + int(row_ends.sum()),), NEWLINE, dtype=torch.long)
    section[token_slots] = high
    return torch.cat([base, section])


def _per_sample(batch: Mapping[str, Any], name: str) -> list[Tensor]:
    lengths = batch["lengths"].tolist()
    if "cu_seqlens" in batch:
        return list(batch[name].split(lengths))
    return [batch[name][i, :n] for i, n in enumerate(lengths)]


def kept_tokens(batch: Mapping[str, Any]) -> list[tuple[Tensor, Tensor]]:
    """``(tokens [n, D], positions [n])`` per sample of a padded (:func:`pad_collate`) or packed batch (tokens as
    the batch holds them: quantized ones are not rescaled here, see :func:`image_features`)."""
    return list(zip(_per_sample(batch, "tokens"), _per_sample(batch, "positions")))


def batch_layouts(batch: Mapping[str, Any], newline: bool) -> list[Tensor]:
    grids = batch["grid"].tolist()
    return [
        image_layout(positions, grid, batch["side"], newline)
        for (_, positions), grid in zip(kept_tokens(batch), grids)
    ]


# --------------------------------------------------------------------------------------------- model side


def vlm_core(model: nn.Module) -> nn.Module:
    """The module holding ``multi_modal_projector`` (``LlavaNextModel`` inside ``...ForConditionalGeneration``)."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "multi_modal_projector"):
            return candidate
    raise TypeError(f"{type(model).__name__} has no multi_modal_projector; expected a LLaVA-NeXT/OneVision model")


def image_newline(model: nn.Module) -> nn.Parameter | None:
    return getattr(vlm_core(model), "image_newline", None)


def projector_input_dim(model: nn.Module) -> int:
    projector = vlm_core(model).multi_modal_projector
    return next(m for m in projector.modules() if isinstance(m, nn.Linear)).in_features


def image_features(model: nn.Module, batch: Mapping[str, Any], layouts: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Per sample, the image section's embeddings ``[len(layout), hidden]``: projected kept tokens and newlines."""
    core = vlm_core(model)
    newline = image_newline(model)
    if layouts is None:
        layouts = batch_layouts(batch, newline is not None)
    samples = kept_tokens(batch)
    dim = projector_input_dim(model)
    if samples[0][0].shape[-1] != dim:
        raise ValueError(
            f"stored tokens have dim {samples[0][0].shape[-1]}, but the model's projector expects {dim}: the "
            "tokens come from a different vision tower (or feature layer) than this model's"
        )
    weight = next(core.multi_modal_projector.parameters())
    tokens = torch.cat([t for t, _ in samples]).to(weight.device)
    # int8 / float8 as stored cross to the device at one byte a value and are rescaled there.
    scales = torch.cat(_per_sample(batch, SCALES_COLUMN)) if SCALES_COLUMN in batch else None
    tokens = dequantize(tokens, scales, weight.dtype)
    projected = core.multi_modal_projector(tokens).split([t.shape[0] for t, _ in samples])
    features = []
    for sample, layout in zip(projected, layouts):
        layout = layout.to(sample.device)
        if newline is not None:
            sample = torch.cat([sample, newline[None].to(sample.dtype)])
            layout = torch.where(layout == NEWLINE, sample.shape[0] - 1, layout)
        features.append(sample[layout])
    return features


def embed_inputs(model: nn.Module, input_ids: Tensor, features: Sequence[Tensor], image_token_id: int) -> Tensor:
    """Text embeddings with the image positions (``image_token_id``) replaced by ``features``, sample by sample."""
    image_mask = input_ids == image_token_id
    counts = image_mask.sum(1).tolist()
    expected = [f.shape[0] for f in features]
    if counts != expected:
        raise ValueError(f"image positions per sample {counts} differ from image feature lengths {expected}")
    embeds = model.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
    flat = torch.cat(list(features)).to(embeds.device, embeds.dtype)
    return embeds.masked_scatter(image_mask[..., None], flat)


# --------------------------------------------------------------------------------------------- text side


@dataclass
class TextInputs:
    input_ids: Tensor  # [B, S]; image_token_id at image positions, pad id in padding
    attention_mask: Tensor  # [B, S] int64
    labels: Tensor | None  # [B, S]; caption tokens and EOS, IGNORE_INDEX elsewhere; None without captions


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_prompts(
    tokenizer: Any,
    image_lengths: Sequence[int],
    image_token_id: int,
    *,
    prompt: str = DEFAULT_PROMPT,
    captions: Sequence[str] | None = None,
    padding_side: Literal["right", "left"] = "right",
) -> TextInputs:
    """Prompt with its ``<image>`` expanded to each sample's image length, plus the caption as target.

    The prompt's text before ``<image>`` is tokenized with the tokenizer's special tokens (BOS), the rest
    without; the caption is followed by EOS. ``padding_side="left"`` suits generation (no captions).
    """
    if prompt.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"prompt must hold exactly one {IMAGE_PLACEHOLDER!r} placeholder, got {prompt!r}")
    if captions is not None and len(captions) != len(image_lengths):
        raise ValueError(f"{len(captions)} captions for {len(image_lengths)} images")
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    before_ids, after_ids = _ids(tokenizer, before, True), _ids(tokenizer, after, False)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sequences, targets = [], []
    for i, n in enumerate(image_lengths):
        context = before_ids + [image_token_id] * int(n) + after_ids
        target = _ids(tokenizer, captions[i], False) + eos if captions is not None else []
        sequences.append(context + target)
        targets.append([IGNORE_INDEX] * len(context) + target)
    width = max(len(s) for s in sequences)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(rows: list[list[int]], fill: int) -> Tensor:
        pads = [[fill] * (width - len(r)) for r in rows]
        return torch.tensor([r + p if padding_side == "right" else p + r for r, p in zip(rows, pads)])

    return TextInputs(
        input_ids=padded(sequences, pad_id),
        attention_mask=padded([[1] * len(s) for s in sequences], 0),
        labels=padded(targets, IGNORE_INDEX) if captions is not None else None,
    )


# --------------------------------------------------------------------------------------------- together


@dataclass
class VLMInputs:
    inputs_embeds: Tensor  # [B, S, hidden]
    attention_mask: Tensor  # [B, S]
    labels: Tensor | None  # [B, S]
    input_ids: Tensor  # [B, S], image_token_id at image positions (what the embeddings were built from)
    image_lengths: Tensor  # [B] image positions per sample (kept tokens + newlines)

    def model_kwargs(self) -> dict[str, Tensor]:
        kwargs = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask}
        return kwargs if self.labels is None else {**kwargs, "labels": self.labels}


def image_token_id(model: nn.Module) -> int:
    return int(model.config.image_token_id)


def build_vlm_inputs(
    model: nn.Module,
    batch: Mapping[str, Any],
    tokenizer: Any,
    *,
    prompt: str = DEFAULT_PROMPT,
    captions: Sequence[str] | None = None,
    for_generation: bool = False,
) -> VLMInputs:
    """A padded or packed batch of pruned samples -> ``model(**inputs.model_kwargs())`` arguments.

    ``captions`` (the targets) default to the batch's ``caption`` column; without any there are no labels.
    ``for_generation``: the prompt alone, left-padded, so ``generate(inputs_embeds=...)`` continues each sample.
    """
    layouts = batch_layouts(batch, image_newline(model) is not None)
    lengths = [int(layout.numel()) for layout in layouts]
    if for_generation:
        captions = None
    elif captions is None:
        captions = batch.get("caption")
    text = tokenize_prompts(tokenizer, lengths, image_token_id(model), prompt=prompt, captions=captions,
                            padding_side="left" if for_generation else "right")
    device = model.get_input_embeddings().weight.device
    input_ids = text.input_ids.to(device)
    embeds = embed_inputs(model, input_ids, image_features(model, batch, layouts), image_token_id(model))
    return VLMInputs(
        inputs_embeds=embeds,
        attention_mask=text.attention_mask.to(device),
        labels=None if text.labels is None else text.labels.to(device),
        input_ids=input_ids,
        image_lengths=torch.tensor(lengths),
    )


@dataclass
class CaptionCollator:
    """DataLoader ``collate_fn``: pruned samples -> a batch plus its tokenized text, ready for :class:`CaptionLoss`.

    Tokenizing here moves the text work into the loader's workers; ``newline`` must say whether the model has an
    ``image_newline`` (see :func:`image_newline`).
    """

    tokenizer: Any
    image_token_id: int
    newline: bool
    prompt: str = DEFAULT_PROMPT
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = pad_collate

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(samples)
        lengths = [int(layout.numel()) for layout in batch_layouts(batch, self.newline)]
        if "caption" not in batch:
            raise ValueError("samples carry no 'caption' column; read the dataset with columns=['caption']")
        text = tokenize_prompts(self.tokenizer, lengths, self.image_token_id, prompt=self.prompt,
                                captions=batch["caption"])
        return {**batch, "input_ids": text.input_ids, "text_attention_mask": text.attention_mask,
                "labels": text.labels}


class CaptionLoss(nn.Module):
    """The causal-LM loss of a :class:`CaptionCollator` batch; the module DDP wraps, so gradients sync."""

    def __init__(self, vlm: nn.Module) -> None:
        super().__init__()
        self.vlm = vlm

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        features = image_features(self.vlm, batch)
        embeds = embed_inputs(self.vlm, batch["input_ids"], features, image_token_id(self.vlm))
        return self.vlm(inputs_embeds=embeds, attention_mask=batch["text_attention_mask"], labels=batch["labels"]).loss
