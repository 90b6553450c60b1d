"""Activations of a Hugging Face ``transformers`` model at a named layer, written as safetensors
shards that :class:`sparse_sae.training.data.ShardSource` reads.

- Vision (DINOv2, CLIP, SigLIP image encoders, ViT-like models) over a folder of images: the
  ``cls`` token, the ``patch`` tokens, or ``all`` tokens (DINOv2 register tokens are skipped).
- Language models over a text file (one document per line): the residual stream, every
  non-padding token.

``layer`` is an int (the residual stream after that many blocks: ``hidden_states[layer]``, 0 the
embeddings, negative counts from the end) or a module name (``encoder.layer.5.mlp``; the module's
output is taken with a forward hook).

Next to the shards goes the examples sidecar (:mod:`sparse_sae.io.sidecar`): the document,
position and token of every text row, the image and patch of every image row, for the feature
browser (``sparse-sae features``).

Models load from a local directory or the local Hugging Face cache only; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from sparse_sae._files import atomic_write
from sparse_sae.io.sidecar import SidecarWriter

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TOKEN_CHOICES = ("all", "cls", "patch")
SHARD_KEY = "activations"
# model types whose image encoder has no CLS token (SigLIP pools with an attention head)
NO_CLS = {"siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"}


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("extraction needs the transformers package: pip install transformers pillow") from exc
    return transformers


def _missing_model_message(name: str, exc: Exception) -> str:
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return (f"model {name!r} is neither a local directory nor in the local Hugging Face cache ({cache}); "
            f"nothing is downloaded at run time. On a machine with internet access run "
            f"`huggingface-cli download {name}` (or `python -c \"import transformers as t; "
            f"t.AutoModel.from_pretrained('{name}'); t.AutoProcessor.from_pretrained('{name}')\"`), then copy the "
            f"cache here or pass the model's directory. ({type(exc).__name__}: {exc})")


def load_model(name: str, device, dtype=torch.float32):
    """``(model, config, kind)`` for a local path or cached name; ``kind`` is ``vision`` or ``language``.
    CLIP and SigLIP load as their image encoders."""
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(_missing_model_message(name, exc)) from exc
    model_type = config.model_type
    vision_types = {"dinov2", "dinov2_with_registers", "vit", "clip_vision_model", "siglip_vision_model",
                    "siglip2_vision_model", "dinov3_vit"}
    if model_type in ("clip", "siglip", "siglip2"):
        cls = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel"}[model_type]
        model = getattr(tf, cls).from_pretrained(name, local_files_only=True, dtype=dtype)
        kind = "vision"
    else:
        model = tf.AutoModel.from_pretrained(name, local_files_only=True, dtype=dtype)
        kind = "vision" if model_type in vision_types or hasattr(config, "image_size") else "language"
    return model.to(device).eval(), model.config, kind


class ShardWriter:
    """Buffers rows and writes ``shard_NNNNN.safetensors`` files of ``shard_rows`` rows each (the
    last may be shorter), each written atomically, plus ``metadata.json`` at the end."""

    def __init__(self, out_dir, shard_rows: int = 65536, dtype=torch.float32, metadata: dict | None = None):
        from safetensors.torch import save_file

        self._save = save_file
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if any(self.out_dir.glob("*.safetensors")):
            raise FileExistsError(f"{self.out_dir} already holds shards; choose an empty output directory")
        self.shard_rows, self.dtype, self.metadata = int(shard_rows), dtype, dict(metadata or {})
        self._pending, self._n_pending, self.n_shards, self.n_rows, self.d = [], 0, 0, 0, None

    def add(self, rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        if self.d is None:
            self.d = rows.shape[1]
        self._pending.append(rows.detach().to("cpu", self.dtype))
        self._n_pending += rows.shape[0]
        while self._n_pending >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        rows = torch.cat(self._pending)
        shard, rest = rows[:n].contiguous(), rows[n:]
        path = self.out_dir / f"shard_{self.n_shards:05d}.safetensors"
        atomic_write(path, lambda p: self._save({SHARD_KEY: shard}, str(p)))
        self.n_shards += 1
        self.n_rows += shard.shape[0]
        self._pending, self._n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]

    def close(self) -> dict:
        if self._n_pending:
            self._flush(self._n_pending)
        meta = {**self.metadata, "n_rows": self.n_rows, "d": self.d, "n_shards": self.n_shards,
                "dtype": str(self.dtype).removeprefix("torch."), "key": SHARD_KEY}
        atomic_write(self.out_dir / "metadata.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
        return meta


def _layer_output(model, layer, inputs: dict) -> torch.Tensor:
    """``B x T x D`` activations at ``layer`` (an int index into ``hidden_states`` or a module name)."""
    if isinstance(layer, int):
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states
        if not -len(hidden) <= layer < len(hidden):
            raise ValueError(f"layer {layer} is out of range: this model has hidden states 0..{len(hidden) - 1} "
                             f"(0 = embeddings, i = after block i)")
        return hidden[layer]
    modules = dict(model.named_modules())
    if layer not in modules:
        names = [n for n in modules if n][:12]
        raise ValueError(f"layer {layer!r} is not a module of this model; give an int (hidden-state index) or a "
                         f"module name such as {names}")
    captured = {}

    def hook(_module, _inp, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output

    handle = modules[layer].register_forward_hook(hook)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if captured["out"].dim() != 3:
        raise ValueError(f"module {layer!r} outputs shape {tuple(captured['out'].shape)}, expected batch x tokens x d")
    return captured["out"]


def parse_layer(layer):
    """An int when ``layer`` spells one, else the module name."""
    if isinstance(layer, int):
        return layer
    try:
        return int(layer)
    except ValueError:
        return str(layer)


def _n_prefix(config) -> int:
    """Tokens before the patches: CLS and register tokens (none for SigLIP)."""
    return 0 if getattr(config, "model_type", "") in NO_CLS else 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def _select_vision_tokens(h: torch.Tensor, tokens: str, config) -> torch.Tensor:
    model_type = getattr(config, "model_type", "")
    n_prefix = _n_prefix(config)
    if tokens == "cls":
        if n_prefix == 0:
            raise ValueError(f"{model_type} image encoders have no CLS token; use --tokens patch or all")
        return h[:, 0]
    if tokens == "patch":
        return h[:, n_prefix:].reshape(-1, h.shape[-1])
    return h.reshape(-1, h.shape[-1])


def image_files(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found (give a directory of images)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return files


def _image_batches(files, processor, batch_size: int) -> Iterator[dict]:
    from PIL import Image, UnidentifiedImageError

    for i in range(0, len(files), batch_size):
        images = []
        for p in files[i:i + batch_size]:
            try:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise ValueError(f"cannot read image {p}: {exc}") from exc
        yield processor(images=images, return_tensors="pt")


def _image_records(first_image: int, n_images: int, n_tokens: int, tokens: str, config) -> torch.Tensor:
    """Sidecar records ``(image, patch)`` of one batch's rows, in the order of
    :func:`_select_vision_tokens` (patch -1: a CLS or register token)."""
    n_prefix = _n_prefix(config)
    patch = torch.arange(n_tokens) - n_prefix             # prefix tokens come out negative
    if tokens == "cls":
        patch = patch[:1]
    elif tokens == "patch":
        patch = patch[n_prefix:]
    patch = patch.clamp(min=-1)
    image = torch.arange(first_image, first_image + n_images)
    return torch.stack([image.repeat_interleave(patch.numel()), patch.repeat(n_images)], 1)


def _image_info(files, root: Path, processor, config, pixel_values, n_tokens: int) -> dict:
    """What the sidecar's image ids mean: paths, the patch grid and how images were fitted."""
    ps = getattr(config, "patch_size", None)
    ps = ps[0] if isinstance(ps, (list, tuple)) else ps
    grid = None
    if ps and pixel_values is not None:
        gh, gw = pixel_values.shape[-2] // ps, pixel_values.shape[-1] // ps
        if gh * gw == n_tokens - _n_prefix(config):
            grid = [gh, gw]
    info = {"root": str(root.resolve()), "images": [str(p.relative_to(root)) for p in files], "grid": grid,
            "crop": "center" if getattr(processor, "do_center_crop", False) else "stretch"}
    if info["crop"] == "center":      # resize the shortest edge, then cut the centre: the browser redoes it
        crop = getattr(processor, "crop_size", None)
        info["shortest_edge"] = _size_of(getattr(processor, "size", None), "shortest_edge")
        info["crop_size"] = [_size_of(crop, "height"), _size_of(crop, "width")] if crop is not None else None
    return info


def _size_of(size, key):
    """A field of an image processor's size (a dict, or a SizeDict in recent transformers)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def token_strings(tokenizer, ids) -> dict:
    """``str(id) -> display string`` with the token's leading space where it starts a word: each
    token is decoded after a plain word and that word's text is cut off (decoding a lone token
    drops the space in SentencePiece and WordPiece tokenizers)."""
    lone = {i: tokenizer.decode([i]) for i in ids}
    anchor = next((i for i in ids if lone[i].strip().isalnum()), None)
    out = {}
    for i in ids:
        text = lone[i]
        if anchor is not None:
            pair, head = tokenizer.decode([anchor, i]), lone[anchor]
            text = pair[len(head):] if pair.startswith(head) else text
        out[str(i)] = text
    return out


def _text_batches(lines, tokenizer, batch_size: int, max_length: int) -> Iterator[dict]:
    for i in range(0, len(lines), batch_size):
        yield tokenizer(lines[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)


@torch.no_grad()
def extract(model: str, inputs, out_dir, layer, *, tokens: str = "all", batch_size: int = 16,
            shard_rows: int = 65536, max_length: int = 256, device: str = "auto", dtype: str = "float32",
            save_dtype: str = "float32", progress: bool = True) -> dict:
    """Runs ``model`` over ``inputs`` (an image folder for vision models, a text file for language
    models) and writes the activations at ``layer`` to shards in ``out_dir``; returns the metadata."""
    tf = _transformers()
    if tokens not in TOKEN_CHOICES:
        raise ValueError(f"tokens must be one of {TOKEN_CHOICES}, got {tokens!r}")
    for name, v in (("batch_size", batch_size), ("shard_rows", shard_rows), ("max_length", max_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    net, config, kind = load_model(model, dev, getattr(torch, dtype))
    layer = parse_layer(layer)
    inputs = Path(inputs)
    meta = {"model": str(model), "layer": layer, "tokens": tokens, "kind": kind, "inputs": str(inputs)}
    writer = ShardWriter(out_dir, shard_rows, getattr(torch, save_dtype), meta)
    if kind == "vision":
        files = image_files(inputs)
        try:
            processor = tf.AutoImageProcessor.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"no image processor for {model!r} locally: {exc}") from exc
        batches, total = _image_batches(files, processor, batch_size), -(-len(files) // batch_size)
    else:
        if tokens != "all":
            raise ValueError(f"tokens={tokens!r} applies to vision models; language models give every token")
        if not inputs.is_file():
            raise FileNotFoundError(f"text file {inputs} not found (give a text file, one document per line)")
        lines = [line for line in inputs.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"text file {inputs} has no non-empty lines")
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"no tokenizer for {model!r} locally: {exc}") from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        batches, total = _text_batches(lines, tokenizer, batch_size, max_length), -(-len(lines) // batch_size)
    sidecar = SidecarWriter(out_dir, "text" if kind == "language" else "image")
    seen_tokens, first, last_pixels, n_tokens = set(), 0, None, 0
    try:
        for batch in tqdm(batches, total=total, desc=f"extract {Path(str(model)).name}", disable=not progress):
            batch = {k: v.to(dev) for k, v in batch.items()}
            if kind == "vision":
                batch["pixel_values"] = batch["pixel_values"].to(net.dtype)
            h = _layer_output(net, layer, batch)
            n_items = h.shape[0]
            if kind == "vision":
                rows = _select_vision_tokens(h, tokens, config)
                sidecar.add(_image_records(first, n_items, h.shape[1], tokens, config).numpy())
                last_pixels, n_tokens = batch["pixel_values"], h.shape[1]
            else:
                mask = batch["attention_mask"].bool()
                rows = h[mask]
                # the sidecar: document, position among its kept tokens, token id (row-major like h[mask])
                pos = mask.long().cumsum(1) - 1
                doc = torch.arange(first, first + n_items, device=mask.device)[:, None].expand_as(mask)
                ids = batch["input_ids"]
                sidecar.add(torch.stack([doc[mask], pos[mask], ids[mask]], 1).cpu().numpy())
                seen_tokens.update(ids[mask].unique().tolist())
            first += n_items
            writer.add(rows.float())
    except BaseException:
        sidecar.abort()
        raise
    if kind == "vision":
        info = _image_info(files, inputs, processor, config, last_pixels, n_tokens)
    else:
        info = {"tokens": token_strings(tokenizer, sorted(seen_tokens))}
    sidecar.close(**info)
    return writer.close()
