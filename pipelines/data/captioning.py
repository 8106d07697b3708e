"""Image captioning with any transformers image-to-text model (BLIP, GIT, ViT-GPT2, ...).

The caption stage's Ray actor holds one `Captioner`; `merge_caption` combines its output with a caption
the source already had. This module imports no Ray, MLflow or pydantic, and transformers only when a
model is loaded.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from PIL import Image

CaptionPolicy = Literal["replace", "append"]


def merge_caption(existing: str | None, generated: str, policy: CaptionPolicy) -> str:
    """`replace`: the generated caption. `append`: "existing, generated", or whichever of the two is non-empty."""
    if policy == "replace":
        return generated
    if policy == "append":
        return ", ".join(part for part in ((existing or "").strip(), generated.strip()) if part)
    raise ValueError(f"unknown caption policy {policy!r}: expected 'replace' or 'append'")


def load_processor(model_id: str, **kwargs) -> tuple[Any, Any, bool]:
    """(preprocessor, tokenizer, takes_text) for a hub id or a local directory.

    A model with a multimodal processor (BLIP, GIT) gets it: it takes images and a text prompt. A model
    saved without one (ViT-GPT2, for which AutoProcessor returns the bare tokenizer) gets its image
    processor and tokenizer separately, and takes no prompt.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin

    processor = AutoProcessor.from_pretrained(model_id, **kwargs)
    if isinstance(processor, ProcessorMixin) and getattr(processor, "tokenizer", None) is not None:
        return processor, processor.tokenizer, True
    image_processor = AutoImageProcessor.from_pretrained(model_id, **kwargs)
    return image_processor, AutoTokenizer.from_pretrained(model_id, **kwargs), False


def load_model(model_id: str, *, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
    """The image-to-text generation model through the Auto classes (AutoModelForVision2Seq before transformers 5)."""
    import transformers

    auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
    return auto.from_pretrained(model_id, dtype=dtype, **kwargs)


class Captioner:
    """Greedy captions for batches of PIL images; the model is frozen in eval mode.

    `prompt` conditions models whose processor takes text (BLIP: "a photography of"); it is removed from
    the start of each caption, ignoring case since uncased tokenizers lowercase it.
    """

    def __init__(self, model_id: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_new_tokens: int = 40, prompt: str | None = None, **kwargs):
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt.strip() if prompt else None
        self.processor, self.tokenizer, takes_text = load_processor(model_id, **kwargs)
        if self.prompt and not takes_text:
            raise ValueError(f"{model_id} has no processor that takes a text prompt; caption it without one")
        self.model = load_model(model_id, dtype=self.dtype, **kwargs).to(self.device).eval().requires_grad_(False)

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        """One caption per image: no newlines, no surrounding whitespace, at most max_new_tokens tokens."""
        if not images:
            return []
        images = [image.convert("RGB") for image in images]
        if self.prompt:
            inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return [self._clean(text) for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def free_cache(self) -> None:
        """Give back the GPU memory a failed batch left cached (an out-of-memory one), before captioning again."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _clean(self, text: str) -> str:
        text = text.replace("\r", " ").replace("\n", " ").strip()
        if self.prompt and text.lower().startswith(self.prompt.lower()):
            text = text[len(self.prompt):].strip()
        return text
