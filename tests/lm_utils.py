"""A tiny causal LM, variable-length sequences and a tokenizer built in code, for token-normalised losses."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer

VOCABULARY = 32
PAD = 0


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A two-layer Llama of a few thousand parameters; it normalises its loss by `num_items_in_batch`."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def sequences(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token sequences of the given lengths (ids 3..VOCABULARY-1), a counting pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        start = int(torch.randint(3, VOCABULARY, (1,), generator=g))
        pattern = [(start + i) % (VOCABULARY - 3) + 3 for i in range(length)]
        noise = torch.randint(3, VOCABULARY, (length,), generator=g).tolist()
        out.append([p if torch.rand(1, generator=g) < 0.8 else n for p, n in zip(pattern, noise)])
    return out


class SequenceDataset(torch.utils.data.Dataset):
    def __init__(self, sequences: list[list[int]]):
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i):
        return {"input_ids": self.sequences[i]}


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked out of attention and labels."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), PAD)
    mask = torch.zeros(len(examples), longest, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, : len(example["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary, built in code (nothing from the Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocabulary = {"<pad>": PAD, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCABULARY)}}
    core = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


class InOrder:
    """Trainer mixin: training batches in dataset order, so a test knows which micro-batch is which."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class NegateThird:
    """Trainer mixin: the third micro-batch of every step trains on the negated loss, so GAF rejects it."""

    passes = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        NegateThird.passes += 1
        if NegateThird.passes % 3 == 0:
            return (-result[0], result[1]) if return_outputs else -result
        return result


class InOrderTrainer(InOrder, Trainer):
    pass
