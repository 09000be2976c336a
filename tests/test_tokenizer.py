"""MedPLIBTokenizer against transformers 4.31 outputs recorded from the reference (golden tokenization.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.tokenizer import (
    ADDED_TOKENS,
    IMAGE_TOKEN_INDEX,
    REGION_TOKEN_INDEX,
    MedPLIBTokenizer,
    save_tokenizer_folder,
)

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
TOKENIZER_DIR = GOLDEN / "tiny-medplib-ref"
pytestmark = pytest.mark.skipif(
    not (TOKENIZER_DIR / "tokenizer.model").is_file(), reason="golden fixtures absent"
)


@pytest.fixture(scope="module")
def tok() -> MedPLIBTokenizer:
    return MedPLIBTokenizer.from_folder(TOKENIZER_DIR)


def _golden() -> dict:
    path = GOLDEN / "tokenization.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"strings": []}


ENTRIES = _golden()["strings"]


@pytest.mark.parametrize("entry", ENTRIES, ids=[repr(e["text"])[:40] for e in ENTRIES])
def test_matches_transformers_431(tok: MedPLIBTokenizer, entry: dict) -> None:
    text = entry["text"]
    assert tok.tokenize(text) == entry["tokenize"]
    assert tok.encode(text) == entry["input_ids"]
    assert tok.encode(text, add_bos=False) == entry["input_ids_no_special"]
    assert tok.encode_prompt(text) == entry["tokenizer_image_token_dataset"]
    assert tok.encode_prompt(text, region_placeholder=False) == entry["tokenizer_image_token_mm_utils"]
    assert tok.decode(entry["input_ids"], skip_special_tokens=True) == entry["decode_skip_special"]
    assert tok.decode(entry["input_ids"]) == entry["decode_keep_special"]


def test_vocabulary_and_special_ids(tok: MedPLIBTokenizer) -> None:
    g = _golden()
    assert len(ENTRIES) == 13
    assert tok.vocab_size == g["len_tokenizer"] == 1267
    assert tok.sp_vocab_size == g["sp_vocab_size"]
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (g["bos"], g["eos"], g["unk"], g["pad"])
    assert tok.seg_token_id == g["seg_token_idx"] == 1000
    assert tok.encode("USER:", add_bos=False)[-1] == g["colon_id"]
    for name, token_id in g["added_token_ids"].items():
        assert tok.token_id(name) == token_id
    assert list(tok.added_tokens) == list(ADDED_TOKENS)
    with pytest.raises(KeyError, match="not an added or special token"):
        tok.token_id("<nope>")


def test_decode_answer_drops_control_tokens(tok: MedPLIBTokenizer) -> None:
    ids = tok.encode("<SEG> The liver <gen_3> is  here.\n ok<region></region></s>")
    assert tok.decode_answer(ids) == "The liver is here.\nok"
    c_vqa = json.loads((GOLDEN / "c_vqa.json").read_text(encoding="utf-8"))
    assert tok.decode_answer(c_vqa["generated_ids"]) == "bilateral"  # golden text: "bilateral <gen_95> ..."
    assert tok.decode_answer([tok.seg_token_id, tok.eos_id]) == ""


def test_decode_accepts_tensors_and_arrays(tok: MedPLIBTokenizer) -> None:
    ids = [1, 327, 950, 1000, 2]
    expected = tok.decode(ids, skip_special_tokens=True)
    assert expected == "ASSISTANT: <SEG>"
    assert tok.decode(torch.tensor(ids), skip_special_tokens=True) == expected
    assert tok.decode(np.array(ids), skip_special_tokens=True) == expected
    assert tok.decode_answer(torch.tensor(ids)) == "ASSISTANT:"


def test_decode_rejects_placeholders(tok: MedPLIBTokenizer) -> None:
    with pytest.raises(ValueError, match="placeholders"):
        tok.decode([1, IMAGE_TOKEN_INDEX, 5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode_answer([tok.vocab_size])


def test_streaming_never_shows_broken_characters(tok: MedPLIBTokenizer) -> None:
    """Byte-fallback pieces of 病变 🙂 arrive one at a time; no delta may contain U+FFFD."""
    ids = tok.encode("unicode: Größe 病变 🙂 naïve café <SEG>", add_bos=False) + [tok.eos_id]
    dec = tok.streaming_decoder()
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.finish())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode_answer(ids) == "unicode: Größe 病变 🙂 naïve café"
    assert sum(1 for d in deltas if d) > 5  # it really streams


def test_golden_prompt_ids(tok: MedPLIBTokenizer) -> None:
    for name in ("a_grounding", "c_vqa"):
        arrays = np.load(GOLDEN / f"{name}.npz")
        record = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))
        full = tok.encode_prompt(record["conversation"])
        assert full == arrays["full_conversation_input_ids"][0].tolist()
        cut = len(full) - full[::-1].index(record["colon_id"])  # the reference cuts after the last ':'
        assert full[:cut] == arrays["input_ids"][0].tolist()
        assert full.count(IMAGE_TOKEN_INDEX) == 1 and REGION_TOKEN_INDEX not in full


def test_save_tokenizer_folder_writes_the_released_layout(tmp_path: Path) -> None:
    out = save_tokenizer_folder(TOKENIZER_DIR / "tokenizer.model", tmp_path / "tok")
    for name in ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name
    reloaded = MedPLIBTokenizer.from_folder(out)
    assert reloaded.encode("What is in <region></region>?") == [1, 391, 277, 279, 1003, 1004, 925, 953]


def test_from_folder_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="added_tokens.json"):
        (tmp_path / "tokenizer.model").write_bytes((TOKENIZER_DIR / "tokenizer.model").read_bytes())
        MedPLIBTokenizer.from_folder(tmp_path)
