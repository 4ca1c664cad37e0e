"""Checkable constraints of the instruct task: sample, render, parse back and check.

Each constraint type is a frozen dataclass with a stable ``kind`` name and

- ``sample(rng, topic, others=())`` (classmethod): a random instance for a prompt about
  ``topic`` that does not :func:`conflict` with the constraints ``others`` already chosen;
- ``render()``: its canonical one-line text, e.g. ``"Answer in at most 40 words."``;
- ``parse(line)`` (classmethod): the instance whose ``render()`` is ``line`` (surrounding
  whitespace ignored), or None when ``line`` is not of this type;
- ``check(response)``: whether ``response`` satisfies it.

Shared rules, used by every check:

- **content**: every check fails a response without a single letter or digit (an empty answer
  follows no instruction, so "at most 40 words" or "do not use the word X" cannot be won by
  saying nothing);
- **word**: a maximal run of non-whitespace characters that holds at least one letter or digit
  (:func:`count_words`); so ``"don't"``, ``"well-known"``, ``"<<Title>>"`` and ``"3.5"`` are
  one word each and a bullet marker ``"*"`` or a dash ``"—"`` is none;
- **whole word match** (keywords, forbidden word): case-insensitive, and the match must not be
  preceded or followed by a letter or digit (:func:`has_word`): ``"Water's"`` contains
  ``"water"``, ``"waters"`` and ``"underwater"`` do not.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from typing import ClassVar, Sequence

from dvpo_lightning.tasks.instruct.topics import COMMON_WORDS, topic_keywords, topic_words

_ALNUM = r"[^\W_]"  # one letter or digit (any script)
_WORD_TEXT = re.compile(r"[a-z]+")


# --- the shared rules ---------------------------------------------------------------------


def has_content(text: str) -> bool:
    """Whether ``text`` holds at least one letter or digit."""
    return re.search(_ALNUM, text) is not None


def count_words(text: str) -> int:
    """Number of words: maximal runs of non-whitespace characters holding a letter or digit."""
    return sum(1 for tok in text.split() if re.search(_ALNUM, tok))


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``.

    The text is cut after every run of ``.``, ``!`` or ``?`` (with any closing quotes or
    brackets ``"')]`` right after it) that is followed by whitespace or the end of the text;
    line breaks alone do not cut. The pieces that hold a letter or digit are the sentences
    (stripped). So ``"Hi. It costs 3.5 euros!"`` is two sentences, ``"e.g. this"`` is two,
    and ``"* apples\\n* pears"`` is one.
    """
    pieces = re.split(r"(?<=[.!?])[\"')\]]*(?=\s|$)", text)
    return [p.strip() for p in pieces if has_content(p)]


def bullet_lines(text: str) -> list[str]:
    """The bullet points of ``text``: the lines that, after leading spaces or tabs, start with
    ``"* "`` or ``"- "`` (a marker then a space). ``"**bold**"``, ``"---"``, ``"-5 degrees"``
    and numbered items ``"1. step"`` are not bullet points; nested bullets count like others."""
    return [line for line in text.splitlines() if re.match(r"[ \t]*[*-] ", line)]


def has_word(text: str, word: str) -> bool:
    """Whether ``word`` occurs in ``text`` as a whole word, case-insensitively (not preceded
    or followed by a letter or digit)."""
    pattern = rf"(?<!{_ALNUM}){re.escape(word)}(?!{_ALNUM})"
    return re.search(pattern, text, re.IGNORECASE) is not None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _check_count(cls: str, field: str, n: object, low: int = 1) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < low:
        raise ValueError(f"{cls}.{field} must be an integer >= {low}, got {n!r}; "
                         f"pass a positive count such as {max(low, 3)}")


def _check_word(cls: str, word: object) -> None:
    if not isinstance(word, str) or not _WORD_TEXT.fullmatch(word):
        raise ValueError(f"{cls} words must be single lowercase ASCII words (letters a-z "
                         f"only), got {word!r}; pass e.g. 'water'")


# --- the constraint types -------------------------------------------------------------------


class Constraint:
    """Base of the constraint types (see the module docstring for the interface)."""

    kind: ClassVar[str]
    PATTERN: ClassVar[re.Pattern]

    @classmethod
    def sample(cls, rng: random.Random, topic: str,
               others: Sequence[Constraint] = ()) -> Constraint:
        """A random instance for a prompt about ``topic``, compatible with ``others``."""
        raise NotImplementedError

    def render(self) -> str:
        """The canonical one-line text of this constraint, as it appears in a prompt."""
        raise NotImplementedError

    @classmethod
    def parse(cls, line: str) -> Constraint | None:
        """The instance whose rendered text is exactly ``line`` (stripped), else None.

        Raises ValueError when ``line`` has the form of this type but a value it rejects
        (e.g. ``"Use at most 0 sentences."``)."""
        line = line.strip()
        m = cls.PATTERN.fullmatch(line)
        if m is None:
            return None
        c = cls._from_match(m)
        return c if c.render() == line else None  # only the canonical text, e.g. no "040"

    @classmethod
    def _from_match(cls, m: re.Match) -> Constraint:
        raise NotImplementedError

    def check(self, response: str) -> bool:
        """Whether ``response`` satisfies the constraint (False without any letter or digit)."""
        return has_content(response) and self._check(response)

    def _check(self, response: str) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class WordCount(Constraint):
    """``"Answer in at most 40 words."`` / ``"Answer in at least 20 words."``: the word count
    (:func:`count_words`) is ``<= n`` or ``>= n``; exactly ``n`` words satisfies both.

    Args:
        relation: ``"at most"`` or ``"at least"``.
        n: the bound, in words.
    """

    relation: str
    n: int

    kind: ClassVar[str] = "word_count"
    PATTERN: ClassVar[re.Pattern] = re.compile(r"Answer in (at most|at least) (\d+) words?\.")
    AT_MOST: ClassVar[tuple[int, ...]] = (25, 30, 40, 50, 60, 80)
    AT_LEAST: ClassVar[tuple[int, ...]] = (10, 15, 20, 30, 40)

    def __post_init__(self) -> None:
        if self.relation not in ("at most", "at least"):
            raise ValueError(f"WordCount.relation must be 'at most' or 'at least', got "
                             f"{self.relation!r}; pass one of those two")
        _check_count("WordCount", "n", self.n)

    @classmethod
    def sample(cls, rng, topic, others=()):
        """Half "at most" a bound of ``AT_MOST``, half "at least" one of ``AT_LEAST``."""
        if rng.random() < 0.5:
            return cls("at most", rng.choice(cls.AT_MOST))
        return cls("at least", rng.choice(cls.AT_LEAST))

    def render(self) -> str:
        return f"Answer in {self.relation} {_plural(self.n, 'word')}."

    @classmethod
    def _from_match(cls, m):
        return cls(m.group(1), int(m.group(2)))

    def _check(self, response):
        k = count_words(response)
        return k <= self.n if self.relation == "at most" else k >= self.n


@dataclass(frozen=True)
class BulletPoints(Constraint):
    """``'Use exactly 3 bullet points, each starting with "* ".'``: exactly ``n`` lines are
    bullet points (:func:`bullet_lines`: ``"* "`` or ``"- "`` after leading spaces); other
    lines (a title, an intro sentence) are allowed.

    Args:
        n: the number of bullet points.
    """

    n: int

    kind: ClassVar[str] = "bullets"
    PATTERN: ClassVar[re.Pattern] = re.compile(
        r'Use exactly (\d+) bullet points?, each starting with "\* "\.')

    def __post_init__(self) -> None:
        _check_count("BulletPoints", "n", self.n)

    @classmethod
    def sample(cls, rng, topic, others=()):
        """2 to 5 bullet points, uniformly."""
        return cls(rng.randint(2, 5))

    def render(self) -> str:
        return f'Use exactly {_plural(self.n, "bullet point")}, each starting with "* ".'

    @classmethod
    def _from_match(cls, m):
        return cls(int(m.group(1)))

    def _check(self, response):
        return len(bullet_lines(response)) == self.n


@dataclass(frozen=True)
class SentenceCount(Constraint):
    """``"Use at most 3 sentences."``: :func:`split_sentences` finds at most ``n`` sentences.

    Args:
        n: the most sentences allowed.
    """

    n: int

    kind: ClassVar[str] = "sentences"
    PATTERN: ClassVar[re.Pattern] = re.compile(r"Use at most (\d+) sentences?\.")

    def __post_init__(self) -> None:
        _check_count("SentenceCount", "n", self.n)

    @classmethod
    def sample(cls, rng, topic, others=()):
        """At most 1 to 5 sentences, uniformly (2 to 5 beside a one-sentence ending phrase)."""
        # leave room for one sentence of the answer's own beside an ending phrase
        low = 1 + max((len(split_sentences(o.phrase)) for o in others
                       if isinstance(o, EndingPhrase)), default=0)
        return cls(rng.randint(max(low, 1), 5))

    def render(self) -> str:
        return f"Use at most {_plural(self.n, 'sentence')}."

    @classmethod
    def _from_match(cls, m):
        return cls(int(m.group(1)))

    def _check(self, response):
        return len(split_sentences(response)) <= self.n


@dataclass(frozen=True)
class Keywords(Constraint):
    """``'Include the words "soil" and "water".'``: every word occurs as a whole word,
    case-insensitively (:func:`has_word`). Case-insensitive on purpose, so that the keywords
    (rendered lowercase) stay satisfiable under the capital-letters rule of :class:`LetterCase`.

    Args:
        words: one to three distinct lowercase words, in rendered order.
    """

    words: tuple[str, ...]

    kind: ClassVar[str] = "keywords"
    PATTERN: ClassVar[re.Pattern] = re.compile(
        r'Include the words? ((?:"[a-z]+", )*(?:"[a-z]+" and )?"[a-z]+")\.')

    def __post_init__(self) -> None:
        if not isinstance(self.words, tuple) or not self.words:
            raise ValueError(f"Keywords.words must be a non-empty tuple of words, got "
                             f"{self.words!r}; pass e.g. ('soil', 'water')")
        for w in self.words:
            _check_word("Keywords", w)
        if len(set(self.words)) != len(self.words):
            raise ValueError(f"Keywords.words must be distinct, got {self.words!r}; "
                             f"drop the repeated word")

    @classmethod
    def sample(cls, rng, topic, others=()):
        """1 to 3 distinct topic words (``topic_keywords``), none of them a forbidden word."""
        banned = {o.word for o in others if isinstance(o, ForbiddenWord)}
        pool = [w for w in topic_keywords(topic) if w not in banned]
        return cls(tuple(rng.sample(pool, rng.randint(1, min(3, len(pool))))))

    def render(self) -> str:
        q = [f'"{w}"' for w in self.words]
        if len(q) == 1:
            return f"Include the word {q[0]}."
        return f"Include the words {', '.join(q[:-1])} and {q[-1]}."

    @classmethod
    def _from_match(cls, m):
        return cls(tuple(re.findall(r'"([a-z]+)"', m.group(1))))

    def _check(self, response):
        return all(has_word(response, w) for w in self.words)


@dataclass(frozen=True)
class ForbiddenWord(Constraint):
    """``'Do not use the word "very".'``: the word does not occur as a whole word, in any case
    (:func:`has_word`; ``"everything"`` does not use ``"very"``).

    Args:
        word: one lowercase word.
    """

    word: str

    kind: ClassVar[str] = "forbidden_word"
    PATTERN: ClassVar[re.Pattern] = re.compile(r'Do not use the word "([a-z]+)"\.')

    def __post_init__(self) -> None:
        _check_word("ForbiddenWord", self.word)

    @classmethod
    def sample(cls, rng, topic, others=()):
        """A common word or a topic word that is neither a word of the topic phrase, a
        required keyword, nor a word of the ending phrase."""
        banned = set(topic_words(topic))
        for o in others:
            if isinstance(o, Keywords):
                banned.update(o.words)
            elif isinstance(o, EndingPhrase):
                banned.update(_WORD_TEXT.findall(o.phrase.lower()))
        pool = [w for w in COMMON_WORDS + topic_keywords(topic) if w not in banned]
        return cls(rng.choice(pool))

    def render(self) -> str:
        return f'Do not use the word "{self.word}".'

    @classmethod
    def _from_match(cls, m):
        return cls(m.group(1))

    def _check(self, response):
        return not has_word(response, self.word)


@dataclass(frozen=True)
class LetterCase(Constraint):
    """``"Write your whole answer in lowercase letters."`` / ``"... in capital letters."``:
    every letter of the response (``str.isalpha``) is lowercase (resp. uppercase); digits,
    punctuation and spaces are not checked, and a response with no letter fails.

    Args:
        case: ``"lowercase"`` or ``"capital"``.
    """

    case: str

    kind: ClassVar[str] = "letter_case"
    PATTERN: ClassVar[re.Pattern] = re.compile(
        r"Write your whole answer in (lowercase|capital) letters\.")

    def __post_init__(self) -> None:
        if self.case not in ("lowercase", "capital"):
            raise ValueError(f"LetterCase.case must be 'lowercase' or 'capital', got "
                             f"{self.case!r}; pass one of those two")

    @classmethod
    def sample(cls, rng, topic, others=()):
        """Lowercase or capital letters, evenly."""
        return cls(rng.choice(("lowercase", "capital")))

    def render(self) -> str:
        return f"Write your whole answer in {self.case} letters."

    @classmethod
    def _from_match(cls, m):
        return cls(m.group(1))

    def apply(self, text: str) -> str:
        """``text`` in this case (lowercased or uppercased)."""
        return text.lower() if self.case == "lowercase" else text.upper()

    def _check(self, response):
        letters = [c for c in response if c.isalpha()]
        if not letters:
            return False
        if self.case == "lowercase":
            return all(c.islower() for c in letters)
        return all(c.isupper() for c in letters)


@dataclass(frozen=True)
class _FixedText(Constraint):
    """A constraint without parameters: its rendered line is the class's ``TEXT``."""

    TEXT: ClassVar[str] = ""

    @classmethod
    def sample(cls, rng, topic, others=()):
        """The only instance (no parameters)."""
        return cls()

    def render(self) -> str:
        return self.TEXT

    @classmethod
    def _from_match(cls, m):
        return cls()


@dataclass(frozen=True)
class JsonFormat(_FixedText):
    """``"Format your whole answer as a JSON object."``: the response, stripped, parses with
    ``json.loads`` to an object (a dict; an array, string or number fails). One Markdown fence
    around it is allowed: ``"```json\\n{...}\\n```"`` or ``"```\\n{...}\\n```"`` (the ``json``
    tag in any case); text before or after the object or fence fails."""

    kind: ClassVar[str] = "json"
    TEXT: ClassVar[str] = "Format your whole answer as a JSON object."
    PATTERN: ClassVar[re.Pattern] = re.compile(re.escape(TEXT))

    def _check(self, response):
        text = response.strip()
        if text.startswith("```"):
            m = re.fullmatch(r"```(?:json)?[ \t]*\n(.*?)```", text, re.DOTALL | re.IGNORECASE)
            if m is None:
                return False
            text = m.group(1)
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False


@dataclass(frozen=True)
class TitleLine(_FixedText):
    """``"Start with a title line in double angular brackets, like <<title>>."``: the first
    line of the response (leading blank lines and spaces skipped, trailing spaces ignored) is
    exactly ``<<title>>``, the title holding a letter or digit and no ``<``, ``>``. Text after
    the ``>>`` on the same line, or a title on a later line, fails."""

    kind: ClassVar[str] = "title"
    TEXT: ClassVar[str] = "Start with a title line in double angular brackets, like <<title>>."
    PATTERN: ClassVar[re.Pattern] = re.compile(re.escape(TEXT))

    def _check(self, response):
        first = response.lstrip().split("\n", 1)[0].rstrip()
        m = re.fullmatch(r"<<([^<>\n]*)>>", first)
        return m is not None and has_content(m.group(1))


@dataclass(frozen=True)
class EndingPhrase(Constraint):
    """``'End your answer with the exact phrase "Hope this helps."'``: the response, with
    trailing whitespace removed, ends with the phrase character for character (case and
    punctuation included).

    Args:
        phrase: the closing phrase: no double quote, no line break, no surrounding spaces.
    """

    phrase: str

    kind: ClassVar[str] = "ending"
    PATTERN: ClassVar[re.Pattern] = re.compile(
        r'End your answer with the exact phrase "([^"\n]+)"')
    PHRASES: ClassVar[tuple[str, ...]] = (
        "Hope this helps.", "Thank you for reading.", "Have a nice day!", "Good luck!",
        "That is all.", "Enjoy!", "Stay safe.", "Any questions?",
    )

    def __post_init__(self) -> None:
        p = self.phrase
        if (not isinstance(p, str) or not has_content(p) or '"' in p or "\n" in p
                or p != p.strip()):
            raise ValueError(f"EndingPhrase.phrase must be one line with a letter or digit, no "
                             f'double quote and no surrounding spaces, got {p!r}; pass e.g. '
                             f"'Hope this helps.'")

    @classmethod
    def sample(cls, rng, topic, others=()):
        """One of ``PHRASES``, put in the case of a :class:`LetterCase` among ``others``."""
        phrase = rng.choice(cls.PHRASES)
        for o in others:
            if isinstance(o, LetterCase):
                phrase = o.apply(phrase)
        return cls(phrase)

    def render(self) -> str:
        return f'End your answer with the exact phrase "{self.phrase}"'

    @classmethod
    def _from_match(cls, m):
        return cls(m.group(1))

    def _check(self, response):
        return response.rstrip().endswith(self.phrase)


CONSTRAINT_TYPES: tuple[type[Constraint], ...] = (
    WordCount, BulletPoints, SentenceCount, Keywords, ForbiddenWord, LetterCase, JsonFormat,
    TitleLine, EndingPhrase,
)
KINDS: tuple[str, ...] = tuple(t.kind for t in CONSTRAINT_TYPES)
_BY_KIND = {t.kind: t for t in CONSTRAINT_TYPES}

# Kinds that never share a prompt (a JSON object has no title line, bullets, free-text ending,
# and "sentences" of JSON text are ill-defined; sentence counting ignores line breaks, so bullets
# with few sentences would force punctuation-free bullets).
EXCLUSIVE_KINDS: frozenset[frozenset[str]] = frozenset(frozenset(p) for p in [
    ("json", "bullets"), ("json", "title"), ("json", "ending"), ("json", "sentences"),
    ("bullets", "sentences"),
])

# The order sample() fills in the parameters, so each constraint can adapt to those before it:
# the ending phrase takes the letter case, keywords and forbidden word avoid each other and the
# phrase, the sentence bound leaves room for the phrase.
_SAMPLE_ORDER: tuple[str, ...] = (
    "letter_case", "ending", "keywords", "forbidden_word", "sentences", "word_count",
    "bullets", "title", "json",
)


def conflict(a: Constraint, b: Constraint) -> str | None:
    """Why ``a`` and ``b`` may not share a prompt, or None when they may.

    The rules: one constraint per kind (so never lowercase with capitals); the pairs of
    :data:`EXCLUSIVE_KINDS`; a forbidden word is neither a required keyword nor a word of the
    ending phrase; the ending phrase is in the letter case required; a sentence bound leaves at
    least one sentence beside the ending phrase's own. Keywords with a letter case are fine:
    keyword matching is case-insensitive.
    """
    if a.kind == b.kind:
        return f"two {a.kind} constraints"
    if frozenset((a.kind, b.kind)) in EXCLUSIVE_KINDS:
        return f"{a.kind} and {b.kind} never share a prompt"
    by = {a.kind: a, b.kind: b}
    fw, kw, end = by.get("forbidden_word"), by.get("keywords"), by.get("ending")
    case, sent = by.get("letter_case"), by.get("sentences")
    if fw and kw and fw.word in kw.words:
        return f"{fw.word!r} is both required and forbidden"
    if fw and end and has_word(end.phrase, fw.word):
        return f"the ending phrase {end.phrase!r} uses the forbidden word {fw.word!r}"
    if case and end and not case.check(end.phrase):
        return f"the ending phrase {end.phrase!r} is not in {case.case} letters"
    if sent and end and sent.n < 1 + len(split_sentences(end.phrase)):
        return f"at most {sent.n} sentences leaves no room beside the ending {end.phrase!r}"
    return None


def _compatible_kind_sets() -> dict[int, list[tuple[str, ...]]]:
    out: dict[int, list[tuple[str, ...]]] = {}
    for n in range(1, len(KINDS) + 1):
        out[n] = [c for c in itertools.combinations(KINDS, n)
                  if not any(frozenset(p) in EXCLUSIVE_KINDS
                             for p in itertools.combinations(c, 2))]
    return {n: v for n, v in out.items() if v}


# n -> every set of n kinds (as tuples in KINDS order) that may share a prompt.
KIND_SETS: dict[int, list[tuple[str, ...]]] = _compatible_kind_sets()
MAX_CONSTRAINTS: int = max(KIND_SETS)


def sample_constraints(rng: random.Random, topic: str, n: int) -> list[Constraint]:
    """``n`` pairwise compatible constraints (:func:`conflict`) for a prompt about ``topic``,
    in a random order; their kinds are drawn uniformly among the compatible sets of ``n`` kinds.
    Deterministic given the state of ``rng``."""
    if n not in KIND_SETS:
        raise ValueError(f"the number of constraints must be in [1, {MAX_CONSTRAINTS}] (the "
                         f"largest compatible set), got {n}; ask for fewer constraints")
    kinds = set(rng.choice(KIND_SETS[n]))
    chosen: list[Constraint] = []
    for kind in _SAMPLE_ORDER:
        if kind in kinds:
            chosen.append(_BY_KIND[kind].sample(rng, topic, chosen))
    for i, a in enumerate(chosen):  # the samplers above keep every rule
        for b in chosen[i + 1:]:
            reason = conflict(a, b)
            if reason is not None:
                raise RuntimeError(f"bug: sampled conflicting constraints ({reason}); the "
                                   f"sample() methods must keep the rules of conflict()")
    rng.shuffle(chosen)
    return chosen


def parse_constraint(line: str) -> Constraint | None:
    """The constraint rendered as ``line`` (stripped), of whatever kind, or None."""
    for t in CONSTRAINT_TYPES:
        c = t.parse(line)
        if c is not None:
            return c
    return None


def constraints_of(prompt: str) -> list[Constraint]:
    """The constraints written in ``prompt``, in order: every line that is the exact rendered
    text of a constraint (surrounding whitespace ignored); other lines (the request) are skipped.

    Raises ValueError, quoting the start of the prompt, when no line is a constraint.
    """
    found = [c for c in map(parse_constraint, prompt.splitlines()) if c is not None]
    if not found:
        head = prompt[:80] + ("..." if len(prompt) > 80 else "")
        raise ValueError(
            f"instruct prompt has no constraint line: {head!r}; an instruct prompt is a request "
            f"line followed by constraint lines in their rendered form, one a line, e.g. "
            f"'Answer in at most 40 words.' (make prompts with InstructTask.sample_prompt)")
    return found
