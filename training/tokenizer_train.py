"""Train the small LLaMA-style SentencePiece model of `medplib-tiny` on the corpus text.

LLaMA layout (what `engine.tokenizer` checks): BPE, `<unk>` 0, `<s>` 1, `</s>` 2, no pad piece, byte
fallback (any text encodes, unknown characters become `<0xNN>` pieces), dummy prefix, identity
normalisation. MedPLIB's 267 added tokens are not pieces: `engine.tokenizer.save_tokenizer_folder` writes
them after the SentencePiece vocabulary, in the released order.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from engine.conversation import LLAVA_V1, VICUNA_V1
from engine.tokenizer import ADDED_TOKENS

log = logging.getLogger(__name__)

SP_VOCAB_SIZE = 1000  # 256 byte pieces + 3 specials + ~740 learnt pieces
_TAGGED_PATH = re.compile(r"<(region|mask)>.*?</\1>")
# Everyday words of the portal's questions, so that typed questions do not fall back to bytes.
EXTRA_TEXT = (
    "Please describe this image. What is shown in the image? What abnormality is seen? Is there any lesion? "
    "Where is the tumour? Segment the liver, kidney, lung, heart, spleen, bone, vessel, cell, nucleus. "
    "What organ is this? Is this image normal? What is the modality? CT MRI X-ray ultrasound microscopy."
)


def corpus_lines(samples: Iterable[dict]) -> list[str]:
    """Question and answer texts of MeCoVQA-style samples with tags, paths and added tokens removed."""
    lines = [LLAVA_V1.system, VICUNA_V1.system, "USER: ASSISTANT:", EXTRA_TEXT]
    for sample in samples:
        for turn in sample["conversations"]:
            text = _TAGGED_PATH.sub(" ", turn["value"]).replace("<image>", " ")
            for token in ADDED_TOKENS:
                text = text.replace(token, " ")
            text = " ".join(text.split())
            if text:
                lines.append(text)
    return lines


def train_sentencepiece(lines: list[str], out_prefix: Path, *, vocab_size: int = SP_VOCAB_SIZE) -> Path:
    """Train a LLaMA-style BPE model on `lines`; returns `<out_prefix>.model`. Deterministic."""
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    path = out_prefix.with_suffix(".model")
    path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    log.info("SentencePiece model with %d pieces -> %s", sp.vocab_size(), path)
    return path
