"""The `--model tiny` path: a small Llama built from a config with a character tokenizer,
warmed up by supervised steps on the task so RL starts with a non-zero reward.

The result is saved with `save_pretrained` under the cache directory, keyed by a hash of
the model config, the task, the warm-up settings and the seed, and always loaded back
through `AutoModelForCausalLM` / `AutoTokenizer` exactly like a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mhpo.trainer.tasks import Task

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CACHE_ENV = "MHPO_CACHE_DIR"


def cache_root() -> Path:
    """`MHPO_CACHE_DIR`, else the user cache directory."""
    return Path(os.environ.get(CACHE_ENV) or user_cache_dir("mhpo"))


def char_tokenizer(charset: str) -> PreTrainedTokenizerFast:
    """One token per character (plus pad/bos/eos/unk); decoding concatenates characters."""
    chars = sorted(set(charset))
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
    )


def tiny_config(vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def supervised_batch(
    tokenizer: PreTrainedTokenizerFast, prompts: list[str], answers: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt+answer+eos ids, attention mask and labels (-100 outside the answer)."""
    seqs, labels = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), -100)
    for i, (s, lab_s) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
        lab[i, width - len(s) :] = torch.tensor(lab_s)
    return ids, mask, lab


def warm_up(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    task: Task,
    steps: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> None:
    """Teacher-forced steps on the task's reference answers (cross-entropy on answer tokens)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        examples = task.sample(rng, batch_size)
        ids, mask, labels = supervised_batch(tokenizer, [e.prompt for e in examples], [e.answer for e in examples])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        loss = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def tiny_model_path(
    task: Task, task_key: str, seed: int, warmup_steps: int, hidden: int = 128, layers: int = 2
) -> Path:
    """Build (or reuse from the cache) the warmed-up tiny model for this task and seed."""
    charset = task.charset()
    key = json.dumps(
        {
            "v": 1,
            "task": task_key,
            "charset": charset,
            "seed": seed,
            "warmup": warmup_steps,
            "hidden": hidden,
            "layers": layers,
        },
        sort_keys=True,
    )
    path = cache_root() / "tiny" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    tokenizer = char_tokenizer(charset)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), hidden=hidden, layers=layers))
    warm_up(model, tokenizer, task, warmup_steps, seed)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "mhpo_tiny.json").write_text(key + "\n")
    try:
        tmp.rename(path)
    except OSError:  # another process finished the same model first
        shutil.rmtree(tmp, ignore_errors=True)
    return path
