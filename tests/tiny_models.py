"""Tiny real models saved to disk, then loaded through the same `from_pretrained` path as hub ids."""

from __future__ import annotations

from pathlib import Path

CORPUS = ["a photo of a cat", "1girl, solo, long hair, masterpiece", "red square on a blue background",
          "low quality, worst quality, text, signature", "the quick brown fox jumps over the lazy dog"]


def make_tiny_text_encoder(directory: Path, *, hidden_size: int = 32) -> Path:
    """A 2-layer Qwen3 with a byte-level BPE tokenizer (pad = eos = <|endoftext|>, as Qwen3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    directory.mkdir(parents=True, exist_ok=True)
    Qwen3Model(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_vae(directory: Path, *, per_channel_stats: bool = True) -> Path:
    """An f8 AutoencoderKL (4 levels, small widths) like the SDXL VAE in shape, ~50k parameters."""
    from diffusers import AutoencoderKL

    kwargs = {}
    if per_channel_stats:
        kwargs = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.5, 1.0, 0.5])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                        sample_size=32, scaling_factor=0.5, shift_factor=0.25, **kwargs)
    vae.save_pretrained(directory)
    return directory


def make_tiny_captioner(directory: Path) -> Path:
    """A ViT encoder + GPT-2 decoder VisionEncoderDecoderModel (as nlpconnect/vit-gpt2-image-captioning), ~65k
    parameters, seeded, with a ViT image processor and no multimodal processor.

    The byte-level BPE has no merges, so every generated token is one character of CORPUS: re-tokenizing a
    caption counts the tokens generated. <|endoftext|> is bos = eos = pad = decoder start, as GPT-2; the LM
    head is untied, since a tied random head keeps predicting its input token (the start token, hence eos).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (GPT2Config, PreTrainedTokenizerFast, ViTConfig, ViTImageProcessor,
                              VisionEncoderDecoderConfig, VisionEncoderDecoderModel)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=1, special_tokens=["<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    special = tokenizer.eos_token_id
    encoder = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    decoder = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                         tie_word_embeddings=False, bos_token_id=special, eos_token_id=special)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = special
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionEncoderDecoderModel(config=config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_checkpoint(directory: Path, *, model, text_encoder: Path, vae: Path | None, stage: dict,
                          ema: dict | None = None) -> Path:
    """`model`'s weights as a training stage's checkpoint (through hdm_model.checkpoint, the format's owner),
    naming the tiny text encoder (16 tokens) and VAE; without `vae`, a checkpoint that names none."""
    from hdm_model import checkpoint

    meta = checkpoint.CheckpointMeta(model=model.config, text_encoder=str(text_encoder), max_length=16,
                                     vae=str(vae) if vae else None, stage=stage)
    return checkpoint.save(directory, weights=model.state_dict(), meta=meta, ema=ema)
