"""Character-level tokenizer for the embedded policy.

Arithmetic is about digits, so one token per character keeps every number's digits visible to a
model too small to learn a subword vocabulary, and the vocabulary (~100 ids) keeps the embedding
table a negligible share of the parameters. Built with ``tokenizers`` so it saves/loads through
the standard ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` path, offline.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = tuple(chr(c) for c in range(32, 127)) + ("\n",)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer: specials at ids 0..3 (``<pad>`` = 0), then printable ASCII and newline.

    No bos/eos is added automatically: prompts are fed as-is and the SFT/RL code appends eos to
    targets itself, so what the model sees is exactly what the caller built. Padding is on the
    left because the tokenizer mostly feeds batched generation.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Any single character, newline included ("." would skip it); spaces stay tokens of their own.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
