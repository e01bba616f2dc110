"""Tiny pipelines of the families with a large language model as text encoder (FLUX.2, Qwen-Image,
Z-Image), built in code for tests: the real pipeline, denoiser, VAE and text-encoder classes with
small widths, and a real byte-level BPE tokenizer whose vocabulary is trained here.

The tokenizer is what makes these honest: each pipeline wraps a caption in its chat template and
reads hidden states at fixed positions (Qwen-Image drops the first 34 tokens, its system prompt).
The vocabulary is trained on the templates' and captions' words, so the real templates tokenize
as the published tokenizers do (Qwen-Image's prefix is 34 tokens, checked in the tests) and any
other text falls back to bytes.
"""
from __future__ import annotations

import json
import re

import torch

from freezeasguard.models.families.flux2 import TEXT_LAYERS

# words every tiny tokenizer holds whole (the CLIP one in tiny.py too); others fall back to characters
CAPTION_WORDS = """a an the of in on with and photo portrait person man woman wearing smiling front wall
logo minimalist shape above below left right beside circle square triangle star red green blue yellow
black white orange purple pink brown gray grey striped dotted plain checked scarf shirt dress hat coat
sweater jacket background brick wooden garden sky sea room hair glasses beard mole eyes looking at
frowning laughing neutral surprised is dog cat tree car house""".split()
QWEN_TEMPLATE_WORDS = ("system Describe the image by detailing the color shape size texture quantity text spatial "
                       "relationships of objects and background user assistant")
# the chat template of the Mistral Small 3.1 tokenizer that FLUX.2's pipeline calls, reduced to text messages
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['content'] is string %}{% set text = m['content'] %}{% else %}"
    "{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}")
# Qwen3's chat template for one user turn (Z-Image calls it with enable_thinking=True: no empty think block)
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[IMG]", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")


def train_byte_bpe(texts, specials) -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE trained on ``texts`` until every word is one token
    (as itself and after a space). A trainer, not hand-made merges: BPE applies merges by rank
    wherever they occur, so merges built word by word conflict and leave words split."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = list(dict.fromkeys(w for t in texts for w in re.findall(r"[A-Za-z0-9]+", t)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(specials))
    tok.train_from_iterator(words + [" " + w for w in words], trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def qwen_tokenizer(extra_words=(), chat_template: str | None = None):
    """A Qwen2Tokenizer (Qwen-Image's and Z-Image's class) with the published special tokens."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_byte_bpe([QWEN_TEMPLATE_WORDS, *CAPTION_WORDS, *extra_words], QWEN_SPECIALS)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def mistral_tokenizer(extra_words=()):
    """A fast byte-level BPE tokenizer with Mistral's special tokens and chat template (FLUX.2's
    pipeline calls tokenizer.apply_chat_template, which a processor and a tokenizer both have)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = train_byte_bpe([SYSTEM_MESSAGE, *CAPTION_WORDS, *extra_words], MISTRAL_SPECIALS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=131072)
    tok.add_special_tokens({"additional_special_tokens": list(MISTRAL_SPECIALS[4:])})
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def build_tiny_llm(family: str, image_size: int = 16, seed: int = 0, extra_words=(), text_width: int | None = None,
                   depth: int | None = None, guidance_embeds: bool = True, native_side: int | None = None,
                   latent_channels: int | None = None):
    """A randomly initialised pipeline object of ``family`` (flux2, qwenimage, zimage).
    ``text_width``, ``depth``, ``native_side`` and ``latent_channels`` (the VAE's) make it look
    like a published model to a preset's folder check; the text encoder keeps two layers (FLUX.2's
    thirty: its pipeline reads layer 30) and a narrow MLP, whatever its width."""
    import diffusers

    torch.manual_seed(seed)
    side = native_side or image_size
    if family == "flux2":
        return _flux2(diffusers, side, extra_words, text_width, depth, guidance_embeds, latent_channels or 4)
    if family == "qwenimage":
        return _qwenimage(diffusers, extra_words, text_width, depth, latent_channels or 4)
    if family == "zimage":
        return _zimage(diffusers, side, extra_words, text_width, depth)
    raise ValueError(f"family {family!r}: build_tiny_llm makes flux2, qwenimage and zimage")


def _flux2(diffusers, image_size, extra_words, text_width, depth, guidance_embeds, channels):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = mistral_tokenizer(extra_words)
    hidden = (text_width or 48) // len(TEXT_LAYERS)     # the pipeline stacks three layers' states
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"))}
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=hidden, intermediate_size=8,
                         max_position_embeddings=1024, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         num_hidden_layers=max(TEXT_LAYERS), rms_norm_eps=1e-5, sliding_window=None,
                         bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, image_size=32, patch_size=8, num_channels=3),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), **{f"{k}_token_id": v for k, v in ids.items()})
    transformer = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * channels, num_layers=depth or 1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=text_width or 48, timestep_guidance_channels=32,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=guidance_embeds)
    vae = diffusers.AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
        latent_channels=channels, norm_num_groups=8, sample_size=image_size)
    with torch.no_grad():       # a trained VAE's batch-norm statistics are not 0 and 1: make the test see them
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                      base_shift=0.5, max_shift=1.15)
    return diffusers.Flux2Pipeline(scheduler=sched, vae=vae, text_encoder=Mistral3ForConditionalGeneration(config).eval(),
                                   tokenizer=tok, transformer=transformer)


def _qwenimage(diffusers, extra_words, text_width, depth, channels):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = qwen_tokenizer(extra_words)
    width = text_width or 16
    special = {k: tok.convert_tokens_to_ids(f"<|{k}|>") for k in ("vision_start", "vision_end", "image_pad")}
    config = Qwen2_5_VLConfig(
        # head width 8 (mrope_section sums to 4); a published width gets one layer, its projections being width^2
        text_config=dict(hidden_size=width, intermediate_size=16, num_hidden_layers=2 if width <= 64 else 1,
                         num_attention_heads=width // 8,
                         num_key_value_heads=1, vocab_size=len(tok), rope_theta=1e6,
                         bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=width),
        vocab_size=len(tok), bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), vision_start_token_id=special["vision_start"], vision_end_token_id=special["vision_end"],
        vision_token_id=special["image_pad"], image_token_id=special["image_pad"])
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * channels, out_channels=channels, num_layers=depth or 2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=width, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=16, z_dim=channels, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=torch.linspace(-0.3, 0.3, channels).tolist(), latents_std=torch.linspace(0.8, 1.5, channels).tolist())
    # Qwen-Image's published schedule: exponential time shift, shifted to a terminal sigma
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    return diffusers.QwenImagePipeline(scheduler=sched, vae=vae, transformer=transformer, tokenizer=tok,
                                       text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval())


def _zimage(diffusers, image_size, extra_words, text_width, depth):
    from transformers import Qwen3Config, Qwen3Model

    tok = qwen_tokenizer(extra_words, chat_template=QWEN3_TEMPLATE)
    width = text_width or 16
    config = Qwen3Config(hidden_size=width, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, vocab_size=len(tok), max_position_embeddings=1024)
    transformer = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=depth or 2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=width, axes_dims=[8, 4, 4], axes_lens=[1024, 32, 32])
    with torch.no_grad():       # made with torch.empty: whatever memory held
        transformer.x_pad_token.normal_(0, 0.02)
        transformer.cap_pad_token.normal_(0, 0.02)
    # Z-Image's VAE is FLUX.1's (16 channels, its published scaling and shift), its schedule a fixed shift of 3
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[32, 64],
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  layers_per_block=1, norm_num_groups=32, sample_size=image_size,
                                  scaling_factor=0.3611, shift_factor=0.1159)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return diffusers.ZImagePipeline(scheduler=sched, vae=vae, tokenizer=tok,
                                    text_encoder=Qwen3Model(config).eval(), transformer=transformer)
