"""Fair marking of quiz answers: answer keys, normalisation and correct / partly correct / wrong.

An `AnswerKey` holds whole answers accepted as correct (the reference answer and its synonyms) and,
for free text, *concepts*: groups of equivalent phrases ("white matter", "wm", "white"). An answer is

- correct when it equals an accepted answer after normalisation (case, punctuation, spelling variants,
  abbreviations such as WM/GM, and word order for short phrases), or names `need` concepts
  (default: all of them);
- partly correct when it names at least one concept but fewer than needed;
- wrong otherwise. A concept preceded by "not"/"no" does not count ("not white matter").

The normalisation table is vocabulary, not case text: cases carry their own keys in their case files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cases.errors import InvalidCaseData

CORRECT, PARTLY, WRONG = "correct", "partly correct", "wrong"
VERDICTS = (CORRECT, PARTLY, WRONG)
SHORT_PHRASE_WORDS = 4  # answers this short may come in any word order ("matter white")
NEGATIONS = frozenset({"not", "no", "never", "without"})
MAX_KEY_PHRASES = 200
MAX_PHRASE_CHARS = 200
# spelling variants and abbreviations → one canonical form (applied word by word, after lower-casing)
VARIANTS: Mapping[str, str] = {
    "wm": "white matter", "gm": "grey matter", "csf": "cerebrospinal fluid", "gray": "grey",
    "hemangioma": "haemangioma", "hemangiomas": "haemangiomas", "hemorrhage": "haemorrhage",
    "tumor": "tumour", "tumors": "tumours", "edema": "oedema", "ct": "computed tomography",
    "mri": "magnetic resonance", "mr": "magnetic resonance", "hu": "hounsfield units",
    "fnh": "focal nodular hyperplasia", "hcc": "hepatocellular carcinoma", "mets": "metastasis",
    "color": "colour", "&": "and",
}  # fmt: skip
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class AnswerKey:
    """Accepted whole answers, concept groups (each a tuple of equivalent phrases) and how many count."""

    accepted: tuple[str, ...]
    concepts: tuple[tuple[str, ...], ...] = ()
    need: int | None = None  # concepts needed for "correct"; None = all
    rejected: tuple[str, ...] = ()  # known wrong answers: always marked wrong (and examples for teachers)

    def __post_init__(self) -> None:
        phrases = [*self.accepted, *self.rejected, *(p for group in self.concepts for p in group)]
        if not self.accepted or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise InvalidCaseData("an answer key needs at least one accepted answer and no empty phrase")
        if len(phrases) > MAX_KEY_PHRASES or any(len(p) > MAX_PHRASE_CHARS for p in phrases):
            raise InvalidCaseData(f"answer keys hold at most {MAX_KEY_PHRASES} phrases of {MAX_PHRASE_CHARS} chars")
        if any(not group for group in self.concepts):
            raise InvalidCaseData("every concept of an answer key needs at least one phrase")
        if self.need is not None and not 1 <= self.need <= len(self.concepts):
            raise InvalidCaseData(f"need must be between 1 and the {len(self.concepts)} concepts, got {self.need}")

    @property
    def needed(self) -> int:
        return len(self.concepts) if self.need is None else self.need

    def to_json(self) -> dict[str, Any]:
        """The case-file form: {"accepted": [...], "concepts": [[...], ...], "need": n or null}."""
        return {"accepted": list(self.accepted), "concepts": [list(g) for g in self.concepts], "need": self.need,
                "rejected": list(self.rejected)}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AnswerKey:
        """Parse the case-file form; InvalidCaseData says which part is malformed."""
        if not isinstance(data, Mapping) or not isinstance(data.get("accepted"), list):
            raise InvalidCaseData("answer_key must be an object with an 'accepted' list")
        concepts = data.get("concepts") or []
        if not isinstance(concepts, list) or not all(isinstance(g, list) for g in concepts):
            raise InvalidCaseData("answer_key.concepts must be a list of lists of phrases")
        need = data.get("need")
        rejected = tuple(data.get("rejected") or ())
        need = None if need is None else int(need)
        return cls(tuple(data["accepted"]), tuple(tuple(g) for g in concepts), need, rejected)

    @classmethod
    def simple(cls, reference: str, synonyms: Sequence[str] = ()) -> AnswerKey:
        """A key of whole answers only (the reference and its synonyms)."""
        return cls((reference, *synonyms))


@dataclass(frozen=True)
class Mark:
    """A verdict (one of VERDICTS), the concepts found and how many were needed."""

    verdict: str
    found: int
    needed: int

    @property
    def correct(self) -> bool | None:
        """True / False for correct / wrong, None for partly correct (the attempts table's column)."""
        return {CORRECT: True, WRONG: False}.get(self.verdict)


def words(text: str) -> tuple[str, ...]:
    """Normalised words: lower case, punctuation dropped, variants and abbreviations expanded."""
    raw = _WORD.findall(text.lower().replace("-", " ").replace("&", " and "))
    out: list[str] = []
    for word in raw:
        out.extend(VARIANTS.get(word, word).split())
    return tuple(_singular(w) for w in out)


def _singular(word: str) -> str:
    """A crude plural fold for matching ('pedicles' → 'pedicle'), never applied to short words."""
    if len(word) > 4 and word.endswith("ae"):
        return word[:-1]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def normalise(text: str) -> str:
    """The normalised answer as one string (see `words`)."""
    return " ".join(words(text))


def _same_answer(given: tuple[str, ...], accepted: tuple[str, ...]) -> bool:
    if given == accepted:
        return True
    return 0 < len(given) <= SHORT_PHRASE_WORDS and sorted(given) == sorted(accepted)


def _has_phrase(given: tuple[str, ...], phrase: tuple[str, ...]) -> bool:
    """True when `phrase` occurs (contiguously, or in any order in a short answer) and is not negated."""
    n = len(phrase)
    for start in range(len(given) - n + 1):
        if given[start : start + n] == phrase and not NEGATIONS & set(given[max(0, start - 2) : start]):
            return True
    return 0 < len(given) <= SHORT_PHRASE_WORDS and set(phrase) <= set(given) and not NEGATIONS & set(given)


def mark_answer(answer: str, key: AnswerKey) -> Mark:
    """Mark a free-text or chosen answer against its key (see the module docstring)."""
    given = words(answer)
    needed = key.needed
    if not given:
        return Mark(WRONG, 0, needed)
    if any(_same_answer(given, words(a)) for a in key.rejected):
        return Mark(WRONG, 0, needed)
    if any(_same_answer(given, words(a)) for a in key.accepted):
        return Mark(CORRECT, needed, needed)
    found = sum(any(_has_phrase(given, words(p)) for p in group) for group in key.concepts)
    if key.concepts and found >= needed:
        return Mark(CORRECT, found, needed)
    return Mark(PARTLY if found else WRONG, found, needed)


def protected_terms(kind: str, key: AnswerKey, choices: Iterable[str] = ()) -> tuple[str, ...]:
    """Phrases a case header must not show while this question is open (its answers and concepts)."""
    if kind == "segmentation":
        return ()
    terms = {*key.accepted, *(p for group in key.concepts for p in group)}
    return tuple(sorted(t for t in terms if len(normalise(t)) >= 3 and t not in set(choices) - set(key.accepted)))


def reveals(text: str, terms: Iterable[str]) -> tuple[str, ...]:
    """The protected terms that `text` contains (whole normalised words; 'midsagittal' reveals 'sagittal')."""
    shown = f" {normalise(text)} "
    joined = shown.replace(" ", "")
    found = []
    for term in terms:
        norm = normalise(term)
        if not norm:
            continue
        if f" {norm} " in shown or (len(norm) >= 6 and " " not in norm and norm in joined):
            found.append(term)
    return tuple(found)


def redact(text: str, terms: Iterable[str], placeholder: str = "…") -> str:
    """`text` with every protected term (and words containing one, e.g. 'midsagittal') replaced."""
    norms = [normalise(t) for t in terms]
    norms = [n for n in norms if n]
    if not norms:
        return text
    tokens = re.split(r"(\s+|[,.;:()/·])", text)
    out = [placeholder if _token_hits(tok, norms) else tok for tok in tokens]
    redacted = "".join(out)
    for norm in sorted((n for n in norms if " " in n), key=len, reverse=True):  # multi-word phrases
        pattern = r"\b" + r"[\s-]+".join(re.escape(w) + r"s?" for w in norm.split()) + r"\b"
        redacted = re.sub(pattern, placeholder, redacted, flags=re.IGNORECASE)
    return redacted


def _token_hits(token: str, norms: Sequence[str]) -> bool:
    word = normalise(token)
    if not word or " " in word:
        return False
    return any(word == n or (" " not in n and len(n) >= 6 and n in word) for n in norms)
