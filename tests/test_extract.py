"""Extraction from tiny randomly initialised transformers models (no download)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from sparse_sae.io.extract import extract  # noqa: E402
from sparse_sae.training.data import open_source  # noqa: E402

HIDDEN = 32


def _images(folder, n=5, size=40):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(size, size + i, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


def _processor(image_size):
    return transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size})


def _vision_model(tmp_path, kind):
    small = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 image_size=32, patch_size=8)
    torch.manual_seed(0)
    if kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**small))
    elif kind == "clip":
        cfg = transformers.CLIPConfig(vision_config=small, text_config=dict(hidden_size=HIDDEN, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64), projection_dim=16)
        model = transformers.CLIPModel(cfg)
    else:
        cfg = transformers.SiglipConfig(vision_config=small, text_config=dict(hidden_size=HIDDEN, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64))
        model = transformers.SiglipModel(cfg)
    path = tmp_path / kind
    model.save_pretrained(path)
    _processor(32).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["dinov2", "clip", "siglip"])
def test_vision_extraction(tmp_path, kind):
    model = _vision_model(tmp_path, kind)
    images = _images(tmp_path / "images")
    n_patches = (32 // 8) ** 2
    meta = extract(str(model), images, tmp_path / "patch", 1, tokens="patch", batch_size=2, shard_rows=30,
                   progress=False)
    assert meta["n_rows"] == 5 * n_patches and meta["d"] == HIDDEN and meta["n_shards"] == 3
    src = open_source(tmp_path / "patch")
    assert (src.n_rows, src.d) == (5 * n_patches, HIDDEN)
    if kind == "dinov2":   # the command line reaches the same code
        from sparse_sae.cli import main
        assert main(["extract", str(model), str(images), str(tmp_path / "cli"), "--layer", "2", "--tokens", "all",
                     "--no-progress"]) == 0
        assert open_source(tmp_path / "cli").n_rows == 5 * (n_patches + 1)
    if kind == "siglip":
        with pytest.raises(ValueError, match="no CLS token"):
            extract(str(model), images, tmp_path / "cls", 1, tokens="cls", progress=False)
        return
    extract(str(model), images, tmp_path / "cls", -1, tokens="cls", progress=False)
    cls = open_source(tmp_path / "cls").rows(0, 5)
    # against the model run directly: CLS token of the last hidden state
    net = (transformers.CLIPVisionModel if kind == "clip" else transformers.AutoModel).from_pretrained(model).eval()
    proc = transformers.AutoImageProcessor.from_pretrained(model)
    imgs = [Image.open(p).convert("RGB") for p in sorted(images.glob("*.png"))]
    with torch.no_grad():
        want = net(**proc(images=imgs, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][:, 0]
    torch.testing.assert_close(cls, want, rtol=1e-4, atol=1e-4)


def test_language_extraction_and_named_module(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = "the cat sat on a mat and dog ran far".split()
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=len(vocab), n_embd=HIDDEN, n_layer=2,
                                                           n_head=2, n_positions=64))
    path = tmp_path / "lm"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    text = tmp_path / "docs.txt"
    text.write_text("the cat sat on a mat\n\na dog ran\nfar far far away\n")
    meta = extract(str(path), text, tmp_path / "resid", 1, batch_size=2, progress=False)
    assert meta["n_rows"] == 6 + 3 + 4 and meta["d"] == HIDDEN        # padding tokens dropped
    extract(str(path), text, tmp_path / "mlp", "h.0.mlp", batch_size=3, progress=False)
    assert open_source(tmp_path / "mlp").n_rows == 13
    assert json.loads((tmp_path / "mlp" / "metadata.json").read_text())["layer"] == "h.0.mlp"
    with pytest.raises(ValueError, match="not a module of this model"):
        extract(str(path), text, tmp_path / "bad", "h.9", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        extract(str(path), text, tmp_path / "bad2", 7, progress=False)


def test_missing_model_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download facebook/dinov2-small"):
        extract("facebook/dinov2-small", tmp_path, tmp_path / "out", 1, progress=False)
