"""The embedded instruct task: constraint checks, parsing, sampling rules and the gold scorer."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from dvpo_lightning.tasks import TASKS, get_task
from dvpo_lightning.tasks.instruct import (
    CONSTRAINT_TYPES,
    KINDS,
    MAX_CONSTRAINTS,
    REQUEST_FORMS,
    TOPICS,
    BulletPoints,
    EndingPhrase,
    ForbiddenWord,
    InstructTask,
    JsonFormat,
    Keywords,
    LetterCase,
    SentenceCount,
    TitleLine,
    WordCount,
    conflict,
    constraints_of,
    parse_constraint,
)
from dvpo_lightning.tasks.instruct.constraints import (
    bullet_lines,
    count_words,
    has_word,
    split_sentences,
)
from dvpo_lightning.tasks.instruct.topics import COMMON_WORDS, topic_words

TASK = InstructTask()
N_PROMPTS = 2000


@pytest.fixture(scope="module")
def sampled() -> list[tuple[str, list]]:
    """2000 prompts (with their constraints) of the default task, seed 0."""
    rng = random.Random(0)
    return [TASK.sample_with_constraints(rng) for _ in range(N_PROMPTS)]


# --- the shared rules ---------------------------------------------------------------------


@pytest.mark.parametrize("text,n", [
    ("", 0), ("   \n ", 0), ("one", 1), ("Don't stop, well-known 3.5!", 4),
    ("* apples\n- pears", 2), ("<<Title>>\nHi — there", 3), ("a . b", 2),
])
def test_count_words(text, n):
    assert count_words(text) == n


@pytest.mark.parametrize("text,n", [
    ("", 0), ("Hi there", 1), ("Hi. It costs 3.5 euros!", 2), ("One! Two? Three...", 3),
    ('He said "stop." Then left.', 2), ("e.g. this", 2), ("* apples\n* pears", 1),
    ("Hello.\nWorld.", 2), ("...", 0),
])
def test_split_sentences(text, n):
    assert len(split_sentences(text)) == n


@pytest.mark.parametrize("text,n", [
    ("* a\n- b\n  * nested", 3), ("**bold** text\n---\n-5 degrees\n1. step", 0),
    ("*a\n-b", 0), ("Intro:\n* a\n* b\nBye", 2), ("", 0),
])
def test_bullet_lines(text, n):
    assert len(bullet_lines(text)) == n


@pytest.mark.parametrize("text,word,found", [
    ("Water is wet", "water", True), ("WATER's edge", "water", True),
    ("waters", "water", False), ("underwater", "water", False), ("(water)", "water", True),
    ("everything", "very", False), ("very_", "very", True), ("", "water", False),
])
def test_has_word(text, word, found):
    assert has_word(text, word) is found


# --- each constraint kind: responses that keep it and that break it ---------------------

FIVE = "one two three four five"

CASES = [
    # (constraint, response, satisfied)
    (WordCount("at most", 5), FIVE, True),  # exactly n words
    (WordCount("at most", 5), FIVE + " six", False),
    (WordCount("at most", 5), "* one\n* two - three", True),  # markers are not words
    (WordCount("at most", 5), "", False),  # empty: no content
    (WordCount("at least", 5), FIVE, True),
    (WordCount("at least", 5), "one two three four", False),
    (WordCount("at least", 1), "!!!", False),
    (BulletPoints(3), "* a\n* b\n* c", True),
    (BulletPoints(3), "Tips:\n- a\n* b\n  - c\nThat is all.", True),  # mixed markers, prose
    (BulletPoints(3), "* a\n* b", False),
    (BulletPoints(3), "* a\n* b\n* c\n* d", False),
    (BulletPoints(2), "1. a\n2. b", False),  # numbered items are not bullets
    (BulletPoints(2), "*a\n*b", False),  # no space after the marker
    (BulletPoints(2), "", False),
    (SentenceCount(2), "Cats purr. Dogs bark!", True),
    (SentenceCount(2), "Cats purr. Dogs bark! Birds sing?", False),
    (SentenceCount(1), "It costs 3.5 euros, e.g.this is one", True),
    (SentenceCount(1), "no punctuation at all\nstill one sentence", True),
    (SentenceCount(3), "", False),
    (Keywords(("soil", "water")), "Good SOIL needs Water.", True),
    (Keywords(("soil", "water")), "Good soil needs waters.", False),  # not a whole word
    (Keywords(("soil",)), "subsoil", False),
    (Keywords(("soil",)), "", False),
    (ForbiddenWord("very"), "Everything is fine.", True),
    (ForbiddenWord("very"), "It is VERY fine.", False),
    (ForbiddenWord("very"), "Very.", False),
    (ForbiddenWord("very"), "", False),  # empty: no content, fails like every check
    (LetterCase("lowercase"), "all lower, 42 times!", True),
    (LetterCase("lowercase"), "all lower but One", False),
    (LetterCase("capital"), "ALL CAPS, 42 TIMES!", True),
    (LetterCase("capital"), "ALL CAPS BUT ONe", False),
    (LetterCase("capital"), "42 !!", False),  # no letters at all
    (LetterCase("lowercase"), "", False),
    (JsonFormat(), '{"answer": "yes"}', True),
    (JsonFormat(), '\n  {"a": [1, 2], "b": {"c": null}}  \n', True),
    (JsonFormat(), '```json\n{"answer": "yes"}\n```', True),
    (JsonFormat(), '```JSON\n{"answer": "yes"}\n```', True),
    (JsonFormat(), '```\n{"answer": "yes"}\n```', True),
    (JsonFormat(), '["a", "b"]', False),  # an array is not an object
    (JsonFormat(), '"just a string"', False),
    (JsonFormat(), 'Here it is: {"answer": "yes"}', False),
    (JsonFormat(), '{"answer": "yes"} Done.', False),
    (JsonFormat(), "{'answer': 'yes'}", False),  # not JSON
    (JsonFormat(), '```json\n{"a": "x"}\n```\n```json\n{"b": "y"}\n```', False),
    (JsonFormat(), "{}", False),  # no content
    (JsonFormat(), "", False),
    (TitleLine(), "<<My Plan>>\nStep one.", True),
    (TitleLine(), "\n  <<My Plan>>  \nStep one.", True),
    (TitleLine(), "<<My Plan>>", True),
    (TitleLine(), "Intro line\n<<My Plan>>\nStep one.", False),  # not on the first line
    (TitleLine(), "<<My Plan>> and more text", False),
    (TitleLine(), "<My Plan>\nStep one.", False),
    (TitleLine(), "<<>>\nStep one.", False),
    (TitleLine(), "", False),
    (EndingPhrase("Hope this helps."), "Use a pot. Hope this helps.  \n", True),
    (EndingPhrase("Hope this helps."), "Hope this helps.", True),
    (EndingPhrase("Hope this helps."), "Use a pot. Hope this helps", False),
    (EndingPhrase("Hope this helps."), "Use a pot. hope this helps.", False),  # case counts
    (EndingPhrase("Hope this helps."), "Hope this helps. Bye.", False),
    (EndingPhrase("Hope this helps."), "", False),
]


@pytest.mark.parametrize("constraint,response,ok", CASES)
def test_constraint_check_known_answers(constraint, response, ok):
    assert constraint.check(response) is ok


def test_known_answers_cover_every_kind():
    assert {c.kind for c, _, _ in CASES} == set(KINDS)
    for kind in KINDS:
        assert {ok for c, _, ok in CASES if c.kind == kind} == {True, False}, kind


# --- rendering and parsing ----------------------------------------------------------------


@pytest.mark.parametrize("constraint,text", [
    (WordCount("at most", 40), "Answer in at most 40 words."),
    (WordCount("at least", 1), "Answer in at least 1 word."),
    (BulletPoints(3), 'Use exactly 3 bullet points, each starting with "* ".'),
    (SentenceCount(1), "Use at most 1 sentence."),
    (Keywords(("soil",)), 'Include the word "soil".'),
    (Keywords(("soil", "sun")), 'Include the words "soil" and "sun".'),
    (Keywords(("a", "b", "c")), 'Include the words "a", "b" and "c".'),
    (ForbiddenWord("very"), 'Do not use the word "very".'),
    (LetterCase("lowercase"), "Write your whole answer in lowercase letters."),
    (LetterCase("capital"), "Write your whole answer in capital letters."),
    (JsonFormat(), "Format your whole answer as a JSON object."),
    (TitleLine(), "Start with a title line in double angular brackets, like <<title>>."),
    (EndingPhrase("Good luck!"), 'End your answer with the exact phrase "Good luck!"'),
])
def test_render_and_parse_known_text(constraint, text):
    assert constraint.render() == text
    assert parse_constraint(text) == constraint
    assert parse_constraint("  " + text + " ") == constraint
    assert type(constraint).parse(text) == constraint
    others = [t for t in CONSTRAINT_TYPES if t is not type(constraint)]
    assert all(t.parse(text) is None for t in others)


@pytest.mark.parametrize("line", [
    "Answer in at most 040 words.",  # not canonical
    "Answer in at most 1 words.",
    'Include the words "a", "b".',
    'Include the word "a" and "b".',
    "answer in at most 40 words.",
    "Answer in at most 40 words",
    "Explain saving money.",
    "",
])
def test_non_canonical_lines_do_not_parse(line):
    assert parse_constraint(line) is None


def test_parse_render_round_trip_for_sampled_constraints(sampled):
    seen = Counter()
    for _, cons in sampled:
        for c in cons:
            assert type(c).parse(c.render()) == c
            assert parse_constraint(c.render()) == c
            seen[c.kind] += 1
    assert set(seen) == set(KINDS)
    assert min(seen.values()) >= 50, seen


def test_every_prompt_parses_back_to_its_constraints(sampled):
    for prompt, cons in sampled:
        assert constraints_of(prompt) == cons
        assert TASK.constraints_of(prompt) == cons
        assert len(prompt.splitlines()) == len(cons) + 1


def test_request_lines_are_never_constraints():
    for form in REQUEST_FORMS:
        for topic in TOPICS:
            assert parse_constraint(form.format(topic=topic)) is None


def test_prompt_without_constraint_raises_with_the_prompt():
    with pytest.raises(ValueError, match="no constraint line: 'Explain saving money.*rendered"):
        constraints_of("Explain saving money.\nPlease be brief.")
    with pytest.raises(ValueError, match=r"'x{80}\.\.\.'"):
        TASK.gold_score("x" * 200, "anything")


def test_malformed_values_raise_with_the_rule():
    with pytest.raises(ValueError, match="integer >= 1, got 0"):
        parse_constraint("Use at most 0 sentences.")
    with pytest.raises(ValueError, match="'at most' or 'at least', got 'about'"):
        WordCount("about", 3)
    with pytest.raises(ValueError, match="distinct"):
        Keywords(("a", "a"))
    with pytest.raises(ValueError, match="single lowercase ASCII words.*'Water'"):
        ForbiddenWord("Water")
    with pytest.raises(ValueError, match="'lowercase' or 'capital'"):
        LetterCase("title")
    with pytest.raises(ValueError, match="no\\s+double quote"):
        EndingPhrase('say "hi"')


# --- sampling -------------------------------------------------------------------------------

EXCLUSIVE = {frozenset(p) for p in [("json", "bullets"), ("json", "title"), ("json", "ending"),
                                    ("json", "sentences"), ("bullets", "sentences")]}


def independent_conflict(a, b) -> bool:
    """The rules of the spec, written out again (not via the module's ``conflict``)."""
    if a.kind == b.kind or frozenset((a.kind, b.kind)) in EXCLUSIVE:
        return True
    pair = {a.kind: a, b.kind: b}
    fw, kw = pair.get("forbidden_word"), pair.get("keywords")
    end, case = pair.get("ending"), pair.get("letter_case")
    if fw and kw and fw.word in kw.words:
        return True
    if fw and end and fw.word in end.phrase.lower().replace("!", " ").replace(".", " ").split():
        return True
    if case and end:
        want = end.phrase.lower() if case.case == "lowercase" else end.phrase.upper()
        if end.phrase != want:
            return True
    return False


def witness(cons) -> str:
    """A response built to keep every constraint in ``cons`` (so they are jointly possible)."""
    by = {c.kind: c for c in cons}
    words = list(by["keywords"].words) if "keywords" in by else []
    wc = by.get("word_count")
    if wc is not None and wc.relation == "at least":
        words += ["lorem"] * wc.n
    body = " ".join(words or ["lorem"])
    if "json" in by:
        text = json.dumps({"answer": body})
    else:
        lines = ["<<notes>>"] if "title" in by else []
        if "bullets" in by:
            lines += [f"* {body}"] + ["* lorem"] * (by["bullets"].n - 1)
        else:
            lines.append(body + ".")
        if "ending" in by:
            lines.append(by["ending"].phrase)
        text = "\n".join(lines)
    if "letter_case" in by:
        text = text.lower() if by["letter_case"].case == "lowercase" else text.upper()
    return text


def test_sampled_prompts_keep_every_rule(sampled):
    counts = Counter()
    for prompt, cons in sampled:
        assert TASK.min_constraints <= len(cons) <= TASK.max_constraints
        counts[len(cons)] += 1
        for i, a in enumerate(cons):
            for b in cons[i + 1:]:
                assert not independent_conflict(a, b), (prompt, a, b)
                assert conflict(a, b) is None
        # every sampled set is jointly satisfiable: a built answer scores 1.0
        assert TASK.gold_score(prompt, witness(cons)) == 1.0, (prompt, witness(cons))
        assert len(prompt.split()) < 60, prompt
    assert set(counts) == {1, 2, 3}


def test_forbidden_word_avoids_the_topic_and_keywords_fit_it(sampled):
    for prompt, cons in sampled:
        topic = next(t for t in TOPICS if t in prompt.splitlines()[0])
        for c in cons:
            if c.kind == "keywords":
                assert set(c.words) <= set(TOPICS[topic])
            if c.kind == "forbidden_word":
                assert c.word in COMMON_WORDS + TOPICS[topic]
                assert c.word not in topic_words(topic)


def test_topic_keywords_are_not_words_of_the_topic():
    assert len(TOPICS) >= 60
    for topic, kws in TOPICS.items():
        assert len(kws) >= 3 and len(set(kws)) == len(kws)
        assert not set(kws) & set(topic_words(topic)), topic


def test_conflict_rules_known_pairs():
    assert conflict(LetterCase("lowercase"), LetterCase("capital"))
    assert conflict(JsonFormat(), BulletPoints(3))
    assert conflict(TitleLine(), JsonFormat())
    assert conflict(JsonFormat(), EndingPhrase("Enjoy!"))
    assert conflict(SentenceCount(3), JsonFormat())
    assert conflict(ForbiddenWord("soil"), Keywords(("sun", "soil")))
    assert conflict(EndingPhrase("Good luck!"), ForbiddenWord("good"))
    assert conflict(LetterCase("capital"), EndingPhrase("Good luck!"))
    assert conflict(SentenceCount(1), EndingPhrase("Enjoy!"))
    assert conflict(LetterCase("capital"), EndingPhrase("GOOD LUCK!")) is None
    assert conflict(LetterCase("capital"), Keywords(("soil",))) is None
    assert conflict(JsonFormat(), Keywords(("soil",))) is None
    assert conflict(ForbiddenWord("very"), EndingPhrase("Good luck!")) is None


def test_sampling_is_deterministic_and_varied():
    a = [TASK.sample_prompt(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    r1, r2 = random.Random(123), random.Random(123)
    assert [TASK.sample_prompt(r1) for _ in range(50)] == [TASK.sample_prompt(r2)
                                                          for _ in range(50)]
    rng = random.Random(1)
    prompts = [TASK.sample_prompt(rng) for _ in range(300)]
    assert len(set(prompts)) > 280
    firsts = {p.splitlines()[0].split(" ")[0] for p in prompts}
    assert len(firsts) >= 5  # varied request forms


def test_min_max_constraints_respected():
    task = InstructTask(min_constraints=MAX_CONSTRAINTS, max_constraints=MAX_CONSTRAINTS)
    rng = random.Random(2)
    for _ in range(200):
        prompt, cons = task.sample_with_constraints(rng)
        assert len(cons) == MAX_CONSTRAINTS == 7
        assert task.gold_score(prompt, witness(cons)) == 1.0
    one = InstructTask(min_constraints=1, max_constraints=1)
    assert all(len(one.sample_with_constraints(rng)[1]) == 1 for _ in range(100))


# --- gold scorer and the task object -------------------------------------------------------

PROMPT2 = 'Give advice on saving money.\nAnswer in at most 5 words.\nInclude the word "budget".'


@pytest.mark.parametrize("response,finished,expected", [
    ("Make a budget.", True, 1.0),                    # both kept, finished
    ("Make a budget.", False, 2 / 3),                 # both kept, cut off
    ("Spend less.", True, 2 / 3),                     # 1 of 2 kept, finished
    ("Spend less.", False, 1 / 3),
    ("Write a budget and stick to it daily.", True, 2 / 3),  # too long, keyword kept
    ("Spend less than you earn every single month.", False, 0.0),
    ("", True, 1 / 3),                                # empty: every check fails
    ("", False, 0.0),
])
def test_gold_score_known_answers(response, finished, expected):
    assert TASK.gold_score(PROMPT2, response, finished) == pytest.approx(expected)


def test_check_reports_each_constraint():
    assert TASK.check(PROMPT2, "Spend less.") == [
        ("Answer in at most 5 words.", True), ('Include the word "budget".', False)]


def test_gold_score_single_constraint():
    p = "Describe the benefits of keeping bees.\nFormat your whole answer as a JSON object."
    assert TASK.gold_score(p, '```json\n{"honey": "sweet"}\n```') == 1.0
    assert TASK.gold_score(p, '["honey"]') == 0.5
    assert TASK.gold_score(p, '["honey"]', finished=False) == 0.0


def test_get_task_and_protocol_members():
    assert TASKS["instruct"] is InstructTask
    t = get_task("instruct", max_constraints=2)
    assert isinstance(t, InstructTask) and t.name == "instruct" and t.alphabet == ""
    assert get_task("instruct") == TASK
    with pytest.raises(NotImplementedError, match="no single reference answer"):
        t.reference(PROMPT2)
    with pytest.raises(NotImplementedError, match="make_instruct_data"):
        t.noisy_response(PROMPT2, 0.1, random.Random(0))


@pytest.mark.parametrize("kwargs,match", [
    ({"min_constraints": 0}, r"1 <= min_constraints <= max_constraints <= 7.*got 0 and 3"),
    ({"min_constraints": 3, "max_constraints": 2}, r"got 3 and 2; fix the task arguments"),
    ({"max_constraints": 8}, r"largest set .* got 1 and 8"),
    ({"max_constraints": 2.5}, r"integer .* got 1 and 2.5"),
])
def test_bad_args_raise_with_the_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_task("instruct", **kwargs)
