"""The embedded conversation set: chat tasks built offline and deterministically from the embedded
King James Bible, so `qwen3 sft runs/seed` needs no data.

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

from qwen3.data.conversations import Messages
from qwen3.data.sources import Verse, kjv_verses

HELD_OUT_VERSES = 300
TRAINING_VERSES = 8000
BOOK_QUESTION = "Which book of the Bible is this verse from?\n"
CONTINUE_PROMPT = "Continue this verse: "
MIN_CONTINUE_WORDS = 6


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


def kjv_chat() -> tuple[list[tuple[str, Messages]], list[tuple[str, Messages]]]:
    """(training, held-out) lists of (task, conversation), in a fixed shuffled order."""
    verses = sorted(kjv_verses(), key=_rank)
    held_out = [pair for verse in verses[:HELD_OUT_VERSES] for pair in verse_conversations(verse)]
    training_verses = verses[HELD_OUT_VERSES:HELD_OUT_VERSES + TRAINING_VERSES]
    training = [pair for verse in training_verses for pair in verse_conversations(verse)]
    return training, held_out
