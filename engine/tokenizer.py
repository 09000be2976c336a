"""MedPLIB tokenizer: SentencePiece plus the transformers-4.31 slow-LlamaTokenizer rules, re-implemented.

MedPLIB was trained and evaluated with transformers 4.31's slow `LlamaTokenizer` (`legacy=True`) after
reloading a folder that holds 267 added tokens. Newer transformers versions tokenise the same text
differently (no whitespace stripping around added tokens), so this module uses the `sentencepiece`
package directly and re-implements the 4.31 rules (reference/medplib.md §4.4):

1. split the text on added tokens and on `<s>`, `</s>`, `<unk>` (leftmost, longest match first);
2. strip the whitespace on both sides of every *added* token (not around `<s>`, `</s>`, `<unk>`);
3. SentencePiece-encode every remaining text piece on its own (each gets the dummy prefix `▁`).

Pinned against transformers 4.31 outputs by `tests/test_tokenizer.py` (golden `tokenization.json`).
Prompt handling after LLaVA's `tokenizer_image_token` (`<image>` → -200) and MedPLIB's dataset
(`<region></region>` → `<region>`, -300, `</region>`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

logger = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200  # placeholder id replaced by the 576 image features
REGION_TOKEN_INDEX = -300  # placeholder id replaced by the pooled region feature
IGNORE_INDEX = -100  # label id ignored by the loss

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "<SEG>"
REGION_START_TOKEN = "<region>"
REGION_END_TOKEN = "</region>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"

# `utils.utils.ADD_OTHERS_TOKENS`, then `<gen_1>`..`<gen_256>`, then `<im_start>`, `<im_end>`: the order in
# which `train_ds_medplib.py` adds them, hence their ids (sp_vocab + i).
OTHER_ADDED_TOKENS: tuple[str, ...] = (
    SEG_TOKEN,
    "<ref>",
    "</ref>",
    REGION_START_TOKEN,
    REGION_END_TOKEN,
    "<sr>",
    "</sr>",
    "<mask>",
    "</mask>",
)
GEN_TOKENS: tuple[str, ...] = tuple(f"<gen_{i}>" for i in range(1, 257))
ADDED_TOKENS: tuple[str, ...] = OTHER_ADDED_TOKENS + GEN_TOKENS + (IM_START_TOKEN, IM_END_TOKEN)
N_ADDED_TOKENS = 267
assert len(ADDED_TOKENS) == N_ADDED_TOKENS

TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")
_REQUIRED_ADDED = (SEG_TOKEN, REGION_START_TOKEN, REGION_END_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
_REPLACEMENT_CHAR = "\ufffd"  # what SentencePiece yields for an incomplete UTF-8 byte sequence


class MedPLIBTokenizer:
    """SentencePiece model + MedPLIB's added tokens, with transformers-4.31 (legacy) semantics.

    Ids: 0..sp_vocab-1 are SentencePiece pieces (`<unk>` 0, `<s>` 1, `</s>` 2); the added tokens follow
    (`<SEG>` = sp_vocab, ..., `<im_end>` = sp_vocab + 266). Negative ids are placeholders (-200 image,
    -300 region) that only `encode_prompt` produces.
    """

    def __init__(self, *, sp_model: spm.SentencePieceProcessor, added_tokens: Mapping[str, int]) -> None:
        self._sp = sp_model
        self._check_added(added_tokens)
        self._added = dict(sorted(added_tokens.items(), key=lambda kv: kv[1]))  # name -> id, by id
        self._added_by_id = {i: t for t, i in self._added.items()}
        self._special = {
            BOS_TOKEN: self._sp.bos_id(),
            EOS_TOKEN: self._sp.eos_id(),
            UNK_TOKEN: self._sp.unk_id(),
        }
        no_split = sorted([*self._added, *self._special], key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in no_split) + ")")

    def _check_added(self, added: Mapping[str, int]) -> None:
        n_sp = self._sp.vocab_size()
        if sorted(added.values()) != list(range(n_sp, n_sp + len(added))):
            raise ValueError(
                f"added token ids must be contiguous from the SentencePiece vocab size {n_sp}; got "
                f"{sorted(added.values())[:3]}... — is added_tokens.json from this tokenizer.model?"
            )
        missing = [t for t in _REQUIRED_ADDED if t not in added]
        if missing:
            raise ValueError(f"added_tokens.json lacks {missing}; this is not a MedPLIB tokenizer folder")
        for name in (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN):
            if self._sp.piece_to_id(name) in (self._sp.unk_id(), -1) and name != UNK_TOKEN:
                raise ValueError(f"tokenizer.model has no {name} piece; MedPLIB needs a LLaMA-style model")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, path: str | Path) -> MedPLIBTokenizer:
        """Load the released layout: tokenizer.model, added_tokens.json, special_tokens_map.json, tokenizer_config.json."""
        folder = Path(path)
        missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} lacks tokenizer files {missing}; expected {list(TOKENIZER_FILES)}"
            )
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if config.get("legacy") is False:
            raise ValueError(
                f"{folder}/tokenizer_config.json has legacy=false; only the legacy=True rules "
                "MedPLIB was trained with are implemented"
            )
        _check_special_map(
            json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8")), folder
        )
        added = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        return cls(sp_model=sp, added_tokens=added)

    # ------------------------------------------------------------------ properties
    @property
    def sp_vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces + added tokens (= len(tokenizer) in transformers; 32267 for MedPLIB)."""
        return self._sp.vocab_size() + len(self._added)

    @property
    def added_tokens(self) -> dict[str, int]:
        """Added token name -> id, in id order."""
        return dict(self._added)

    @property
    def bos_id(self) -> int:
        return self._special[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._special[EOS_TOKEN]

    @property
    def unk_id(self) -> int:
        return self._special[UNK_TOKEN]

    @property
    def pad_id(self) -> int:
        """MedPLIB pads with `<unk>` (`pad_token = unk_token`)."""
        return self._special[UNK_TOKEN]

    @property
    def seg_token_id(self) -> int:
        return self._added[SEG_TOKEN]

    def token_id(self, name: str) -> int:
        """Id of an added token or of `<s>`, `</s>`, `<unk>`; KeyError naming the known ones otherwise."""
        if name in self._added:
            return self._added[name]
        if name in self._special:
            return self._special[name]
        raise KeyError(
            f"{name!r} is not an added or special token (e.g. {SEG_TOKEN}, {REGION_START_TOKEN}, {EOS_TOKEN})"
        )

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ encoding
    def _pieces(self, text: str) -> list[tuple[str, bool]]:
        """Split on added/special tokens and strip whitespace around added tokens (4.31 rule)."""
        parts = [p for p in self._split_re.split(text) if p]
        for i, part in enumerate(parts):
            if part not in self._added:
                continue
            if i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
            if i > 0:
                parts[i - 1] = parts[i - 1].rstrip()
        no_split = self._added.keys() | self._special.keys()
        return [(p, p in no_split) for p in parts if p]

    def tokenize(self, text: str) -> list[str]:
        """Pieces as transformers 4.31 `tokenize` gives them (no BOS)."""
        out: list[str] = []
        for part, is_token in self._pieces(text):
            out.extend([part] if is_token else self._sp.encode(part, out_type=str))
        return out

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text` (`tokenizer(text).input_ids` in 4.31; BOS first unless add_bos=False)."""
        ids = [self.bos_id] if add_bos else []
        for part, is_token in self._pieces(text):
            if is_token:
                ids.append(self._added.get(part, self._special.get(part)))
            else:
                ids.extend(self._sp.encode(part, out_type=int))
        return ids

    def encode_prompt(self, text: str, *, region_placeholder: bool = True) -> list[int]:
        """Prompt ids with placeholders: LLaVA `tokenizer_image_token` + MedPLIB's region rule.

        Every `<image>` becomes IMAGE_TOKEN_INDEX (-200); each chunk between them is encoded on its own
        and only the first keeps its BOS. With region_placeholder (the dataset/demo behaviour),
        REGION_TOKEN_INDEX (-300) is inserted between every adjacent `<region>` `</region>` id pair.
        """
        chunks = [self.encode(chunk) for chunk in text.split(IMAGE_TOKEN)]
        ids = [self.bos_id] + chunks[0][1:]
        for chunk in chunks[1:]:
            ids += [IMAGE_TOKEN_INDEX] + chunk[1:]
        return (
            insert_region_placeholders(ids, self._added[REGION_START_TOKEN], self._added[REGION_END_TOKEN])
            if region_placeholder
            else ids
        )

    # ------------------------------------------------------------------ decoding
    def _id_to_piece(self, token_id: int) -> str:
        if token_id in self._added_by_id:
            return self._added_by_id[token_id]
        if not 0 <= token_id < self._sp.vocab_size():
            raise ValueError(
                f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1}); "
                "placeholders (-200 image, -300 region) cannot be decoded, drop them first"
            )
        return self._sp.id_to_piece(token_id)

    def _pieces_to_string(self, pieces: Sequence[str]) -> str:
        """4.31 `LlamaTokenizer.convert_tokens_to_string`: `<s>`/`</s>`/`<unk>` kept literally."""
        out, run, prev_special = "", [], False
        for i, piece in enumerate(pieces):
            if piece in self._special:
                out += (" " if not prev_special and i != 0 else "") + self._sp.decode(run) + piece
                run, prev_special = [], True
            else:
                run.append(piece)
                prev_special = False
        return out + self._sp.decode(run)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text as transformers 4.31 `decode` gives it after reload.

        Added tokens are not "special" after reload, so they are kept even with skip_special_tokens and
        surrounded by single spaces; skip_special_tokens drops only `<s>`, `</s>`, `<unk>`.
        """
        skip = set(self._special.values()) if skip_special_tokens else set()
        sub_texts: list[str] = []
        run: list[str] = []
        for token_id in (int(i) for i in ids):  # accepts lists, numpy arrays and 1-D tensors
            if token_id in skip:
                continue
            piece = self._id_to_piece(token_id)
            if piece in self._added:
                if run:
                    sub_texts.append(self._pieces_to_string(run))
                    run = []
                sub_texts.append(piece)
            else:
                run.append(piece)
        if run:
            sub_texts.append(self._pieces_to_string(run))
        return " ".join(sub_texts)

    def _answer_text(self, ids: Iterable[int]) -> str:
        """Plain SentencePiece text of the non-control ids (no whitespace clean-up)."""
        control = set(self._added_by_id) | set(self._special.values())
        kept = [int(i) for i in ids if int(i) not in control]
        for token_id in kept:
            self._id_to_piece(token_id)  # raises on placeholders / out-of-range ids
        return self._sp.decode(kept)

    def decode_answer(self, ids: Iterable[int]) -> str:
        """User-facing answer text: every added token (`<SEG>`, `<gen_N>`, `<region>`, ...) and `<s>`,
        `</s>`, `<unk>` dropped; runs of spaces collapsed, spaces around line breaks removed, stripped.
        Line breaks themselves are kept (answers may be lists)."""
        return clean_answer_text(self._answer_text(ids))

    def streaming_decoder(self) -> StreamingDecoder:
        """A fresh `StreamingDecoder` for one answer."""
        return StreamingDecoder(self)


class StreamingDecoder:
    """Turns a growing list of generated ids into text deltas whose concatenation is `decode_answer`.

    Text is held back while it ends in an incomplete UTF-8 sequence (byte-fallback pieces such as
    `<0xE7>` `<0x97>` `<0x85>` = "病"), or in whitespace that may still be stripped.
    Usage: `delta = dec.push(token_id)` for every generated id, then `dec.finish()` once.
    """

    def __init__(self, tokenizer: MedPLIBTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    @property
    def text(self) -> str:
        """What has been emitted so far."""
        return self._emitted

    def push(self, token_id: int) -> str:
        """Add one generated id; return the new text that is now safe to show ("" if none)."""
        self._ids.append(int(token_id))
        visible = clean_answer_text(self._tok._answer_text(self._ids))
        return self._emit(visible.rstrip(_REPLACEMENT_CHAR))

    def finish(self) -> str:
        """Flush what was held back; after this, `text == tokenizer.decode_answer(ids)`."""
        return self._emit(self._tok.decode_answer(self._ids))

    def _emit(self, visible: str) -> str:
        if not visible.startswith(self._emitted) or len(visible) <= len(self._emitted):
            return ""
        delta = visible[len(self._emitted) :]
        self._emitted = visible
        return delta


def clean_answer_text(text: str) -> str:
    """Collapse runs of spaces/tabs to one space, drop spaces around line breaks, strip both ends."""
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    return text.strip()


def insert_region_placeholders(ids: Sequence[int], region_start_id: int, region_end_id: int) -> list[int]:
    """Insert REGION_TOKEN_INDEX between every adjacent (`<region>`, `</region>`) id pair."""
    out: list[int] = []
    for i, token_id in enumerate(ids):
        out.append(token_id)
        if token_id == region_start_id and i + 1 < len(ids) and ids[i + 1] == region_end_id:
            out.append(REGION_TOKEN_INDEX)
    return out


def _check_special_map(special_map: Mapping[str, object], folder: Path) -> None:
    """The special tokens must be LLaMA's; anything else would silently shift ids."""
    expected = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    for key, want in expected.items():
        value = special_map.get(key)
        content = value.get("content") if isinstance(value, Mapping) else value
        if content != want:
            raise ValueError(f"{folder}/special_tokens_map.json: {key} is {content!r}, expected {want!r}")


# ---------------------------------------------------------------------- writing the released layout
def _added_token_json(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _dump(obj: object) -> str:
    """transformers 4.31's JSON formatting for tokenizer files."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def save_tokenizer_folder(
    sp_model_path: str | Path, out_dir: str | Path, *, model_max_length: int = 512
) -> Path:
    """Write the released MedPLIB tokenizer layout for a LLaMA-style SentencePiece model.

    Files: tokenizer.model (copied), added_tokens.json (ADDED_TOKENS with ids sp_vocab + i),
    special_tokens_map.json and tokenizer_config.json as transformers 4.31 `save_pretrained` writes them
    after MedPLIB's tokenizer procedure. Returns out_dir.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    n_sp = sp.vocab_size()
    if [sp.id_to_piece(i) for i in (0, 1, 2)] != [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]:
        raise ValueError(f"{sp_model_path}: ids 0, 1, 2 must be <unk>, <s>, </s> (LLaMA layout)")
    shutil.copyfile(sp_model_path, out / "tokenizer.model")
    (out / "added_tokens.json").write_text(
        _dump({t: n_sp + i for i, t in enumerate(ADDED_TOKENS)}), encoding="utf-8"
    )
    special = {
        "bos_token": _added_token_json(BOS_TOKEN),
        "eos_token": _added_token_json(EOS_TOKEN),
        "pad_token": UNK_TOKEN,
        "unk_token": _added_token_json(UNK_TOKEN),
    }
    (out / "special_tokens_map.json").write_text(_dump(special), encoding="utf-8")
    typed = {
        k: {"__type": "AddedToken", **_added_token_json(v)}
        for k, v in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN), ("unk_token", UNK_TOKEN))
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        **typed,
    }
    (out / "tokenizer_config.json").write_text(_dump(config), encoding="utf-8")
    logger.info("wrote MedPLIB tokenizer layout (%d + %d tokens) to %s", n_sp, len(ADDED_TOKENS), out)
    return out
