"""A tiny random-weight Qwen2.5-VL, built offline in seconds, for tests of image input.

No trained vision-language model ships in any package we can install, so tests of
``/vision``, ``/multimodal`` and ``image_url`` parts run on the production model's
architecture (``Qwen2_5_VLForConditionalGeneration``) at toy sizes: text hidden 128 in
2 layers, a 2-block vision tower (patch 14, 2x2 merge), a byte-level BPE tokenizer
trained here on Python's own sources with Qwen's special tokens, and Qwen2-VL's chat
template. The weights come from a fixed seed, so two builds answer alike. Its text is
gibberish; the code path (vLLM's image processor, placeholder expansion, the vision
tower's tokens in the KV cache) is the real one.

Built by :func:`cloudllm_serve.devhost.prepare_models.prepare` for ``LLM_MODEL=test-vlm``.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

NAME = "test-vlm"
SEED = 20261125
VOCAB_SIZE = 2048
#: Standard deviation of the random weights: large enough that the next token depends on
#: the input (at the usual 0.02 a toy model says the same thing to every image).
INIT_RANGE = 0.2

#: Qwen2.5-VL's special tokens (ids follow the trained vocabulary, in this order).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
]

#: Qwen2-VL's chat template: an image part renders as one ``<|image_pad|>``, which the
#: processor widens to the image's token count.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Pixel bounds of the image processor (Qwen's defaults; the engine may override them
#: with ``VLLM_MM_PROCESSOR_KWARGS``).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


def _training_text() -> list[str]:
    """Local text to train the tokenizer on: a fixed set of Python's standard modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


def _tokenizer(out: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_training_text(), trainer)
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def build(out: Path) -> None:
    """Write the model folder (config, weights, tokenizer, processor) into ``out``."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}  # type: ignore[attr-defined]
    vocab = len(tokenizer)  # type: ignore[arg-type]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "max_window_layers": 2,
            "rms_norm_eps": 1e-6,
            "initializer_range": INIT_RANGE,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            # head_dim 32: the three rotary sections (time, height, width) add up to 16.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [4, 6, 6],
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 128,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "initializer_range": INIT_RANGE,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config)  # type: ignore[no-untyped-call]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(out)

    image_processor = Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=14, merge_size=2)
    processor = Qwen2_5_VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    (out / "cloudllm-test-vlm.json").write_text(
        json.dumps({"seed": SEED, "special_token_ids": ids}, indent=1) + "\n"
    )
