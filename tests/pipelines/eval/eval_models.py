"""Random judges for the evaluation metrics, saved the way their real weights come: an Inception-v3 state dict
in torchvision's file layout (auxiliary head included) and a tiny CLIP folder for `from_pretrained`."""

from __future__ import annotations

import string
from pathlib import Path

import torch


def save_random_inception(path: Path, *, variant: str = "torchvision", seed: int = 0) -> Path:
    """A randomly initialised Inception-v3 as torchvision's inception_v3_google-*.pth holds it: the trunk,
    fc, and the auxiliary head AuxLogits.* (conv0 768->128 1x1, conv1 128->768 5x5, fc 768->classes).
    Convolutions get He init so that features keep their scale through the 94 layers (PyTorch's default
    init shrinks them to ~1e-8, where every image looks alike)."""
    from pipelines.eval.inception import CLASSES, InceptionV3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InceptionV3(variant)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        state = dict(model.state_dict())
        for name, (cin, cout, k) in {"conv0": (768, 128, 1), "conv1": (128, 768, 5)}.items():
            state |= {f"AuxLogits.{name}.conv.weight": torch.randn(cout, cin, k, k) * 0.01,
                      f"AuxLogits.{name}.bn.weight": torch.ones(cout), f"AuxLogits.{name}.bn.bias": torch.zeros(cout),
                      f"AuxLogits.{name}.bn.running_mean": torch.zeros(cout),
                      f"AuxLogits.{name}.bn.running_var": torch.ones(cout)}
        state |= {"AuxLogits.fc.weight": torch.randn(CLASSES[variant], 768) * 0.01,
                  "AuxLogits.fc.bias": torch.zeros(CLASSES[variant])}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def make_tiny_clip(directory: Path, *, seed: int = 0) -> Path:
    """A 2-layer CLIP (32-d text and vision towers, 16-d projection, 32 px images) with a CLIP tokenizer over
    single letters and a CLIP image processor, written with save_pretrained as a hub repo holds them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # CLIP's BPE marks a word's last piece with </w>
        vocab |= {c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase + string.digits + ",.")}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **tower),
                        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory
