"""CLIP score: how well images match their prompts, judged by any transformers CLIP model (a hub id such as
openai/clip-vit-base-patch32, or a local folder saved with `save_pretrained`).

    CLIP score = 100 * mean over (image, prompt) pairs of max(cos(image embedding, text embedding), 0)

the usual text-to-image definition (torchmetrics' CLIPScore; Hessel et al.'s CLIP-S weighs by 2.5 instead).
Values depend on the CLIP model: compare them only under the same one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


class ClipScorer:
    """A CLIP model and its processor, loaded once through `from_pretrained`."""

    def __init__(self, model: str, *, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(f"no CLIP model at {model!r} (a hub id or a save_pretrained folder with its "
                                    f"tokenizer and image processor): {str(error).splitlines()[0]}") from error
        self.device = torch.device(device)
        self.max_length = self.model.config.text_config.max_position_embeddings  # longer prompts are cut

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image], *, batch_size: int = 32) -> torch.Tensor:
        """(N, D) unit-length image embeddings."""
        out = []
        for i in range(0, len(images), batch_size):
            pixels = self.processor.image_processor(images=[im.convert("RGB") for im in images[i:i + batch_size]],
                                                    return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self.model.get_image_features(pixel_values=pixels).pooler_output)
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """(N, D) unit-length text embeddings."""
        out = []
        for i in range(0, len(prompts), batch_size):
            tokens = self.processor.tokenizer(list(prompts[i:i + batch_size]), padding=True, truncation=True,
                                              max_length=self.max_length, return_tensors="pt").to(self.device)
            out.append(self.model.get_text_features(**tokens).pooler_output)
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)

    def pair_scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """100 * max(cos, 0) of images[i] with prompts[i]; each distinct prompt is encoded once."""
        if len(images) != len(prompts) or not images:
            raise ValueError(f"CLIP score needs one prompt per image, got {len(images)} images and "
                             f"{len(prompts)} prompts")
        index = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        text = self.text_embeddings(list(index))[[index[p] for p in prompts]]  # (N, D)
        cos = (self.image_embeddings(images) * text).sum(dim=-1)  # (N,)
        return (100 * cos.clamp(min=0)).cpu().numpy()

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
        """The CLIP score of the pairs (images[i], prompts[i])."""
        return float(self.pair_scores(images, prompts).mean())
