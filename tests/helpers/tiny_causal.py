"""A tiny causal LM and its tokenizer, built offline in well under a second, saved as a model folder.

The tokenizer is a byte-level BPE trained here with the ``tokenizers`` library on arithmetic
problems (digits split one by one, like SmolLM2's), with SmolLM2's chat template and special
tokens; the model is a 2-layer Llama with hidden size 32 drawn from a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rankscope.tasks.arithmetic import SYSTEM, generate

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer(pad: bool = True, chat_template: bool = True) -> PreTrainedTokenizerFast:
    train, held = generate(200, 20)
    corpus = [p.question + "\n" + p.answer for p in train + held] + [SYSTEM, "Question: Answer: User: Assistant: system user"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>" if pad else None)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie,
                         initializer_range=0.3)  # large enough embeddings for confident logits (|logit| up to ~10)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_causal_folder(path: Path, pad: bool = True, chat_template: bool = True, seed: int = 0) -> Path:
    """Save the tiny model and tokenizer into ``path`` (usable as ``--model path``)."""
    tokenizer = tiny_tokenizer(pad=pad, chat_template=chat_template)
    tiny_model(tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
