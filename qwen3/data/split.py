"""How a corpus is split into training and validation text, leak-free, whatever its number of documents.

By document when it can: document i (counting documents with text) is held out when
floor((i+1)·f + ½) > floor(i·f + ½), f = val_fraction, so after any n documents exactly round(n·f)
are, evenly spaced (`is_validation`); no token of a held-out document is trained on. That needs a
few documents (`documents_needed`: 5 at f = 0.1), and one text file is one document, so a corpus
with fewer is split the same way by paragraph (blank-line separated) when it has enough of them,
else its last f of text is held out: the piece of text holding that point is cut at a line start
into the end of a training document and the start of a validation one, so no document, and no
window, crosses the cut. `choose_split` decides before anything is tokenized, by counting
documents, then paragraphs, only as far as it needs to, so a corpus of many documents is read no
further than its first few; a corpus that falls back is small in documents and read whole, which
also gives the tail's position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from qwen3.data.sources import Source, iter_pieces, split_documents


@dataclass(frozen=True)
class Split:
    """How a corpus is split: "document" (evenly spaced documents held out), "paragraph" (the same,
    every paragraph a document) or "tail" (the text from character `tail_start` on held out), with
    the counts that chose it."""

    mode: str
    documents: int = 0    # of the corpus, when there were too few to split by (else not counted)
    paragraphs: int = 0   # likewise
    tail_start: int = 0

    def assign(self, sources: list[Source], val_fraction: float) -> Iterator[tuple[str, str, bool]]:
        """The sources' pieces of text as (text, "train" or "val", ends_document)."""
        if self.mode == "tail":
            return _by_tail(iter_pieces(sources), self.tail_start)
        return _by_document(_pieces(sources, "paragraph" if self.mode == "paragraph" else "file"), val_fraction)

    def describe(self, held: int, total: int, val_fraction: float = 0.0) -> str:
        """In words, with the documents (or paragraphs) held out of the total stored."""
        if self.mode == "document":
            return f"split by document: {held:,} of {total:,} held out"
        few = f"{self.documents:,} document{'' if self.documents == 1 else 's'}"
        if self.mode == "paragraph":
            return (f"split by paragraph: {few}, too few to split by document; "
                    f"{held:,} of {total:,} paragraphs held out")
        return (f"the last {val_fraction:.0%} of the text held out: {few} of {self.paragraphs:,} "
                f"paragraph{'' if self.paragraphs == 1 else 's'}, too few to split by document or paragraph")


def choose_split(sources: list[Source], val_fraction: float) -> Split:
    """By document when the corpus has enough documents for both splits (`documents_needed`), else
    by paragraph when it has enough paragraphs, else the tail. Counting stops at what is needed, so
    a corpus of many documents is read no further than its first few."""
    needed = documents_needed(val_fraction)
    documents, characters = _count(_pieces(sources, "file"), needed)
    if documents >= needed:
        return Split("document")
    paragraphs, _ = _count(_pieces(sources, "paragraph"), needed)
    if paragraphs >= needed:
        return Split("paragraph", documents, paragraphs)
    return Split("tail", documents, paragraphs, tail_start=round(characters * (1 - val_fraction)))


def documents_needed(val_fraction: float) -> int:
    """The fewest documents the split by document puts on both sides (5 at val_fraction 0.1)."""
    count = held = 0
    while held in (0, count):
        held += is_validation(count, val_fraction)
        count += 1
    return count


def _pieces(sources: list[Source], doc_mode: str) -> Iterator[tuple[str, bool]]:
    """The sources' pieces of documents with text, each paragraph one with doc_mode "paragraph"."""
    return _with_text(split_documents(iter_pieces(sources), doc_mode))


def _with_text(pieces: Iterable[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    """Blank documents dropped (leading blank pieces of a document too), so document numbers, and
    with them the split, count only documents with text."""
    started = False  # whether the current document has had text yet
    for text, ends in pieces:
        if not started and (not text or text.isspace()):
            continue
        yield text, ends
        started = not ends


def _count(pieces: Iterable[tuple[str, bool]], up_to: int) -> tuple[int, int]:
    """(documents, characters) of `pieces`, read until `up_to` documents are counted."""
    documents = characters = 0
    for text, ends in pieces:
        characters += len(text)
        documents += ends
        if documents == up_to:
            break
    return documents, characters


def _by_document(pieces: Iterable[tuple[str, bool]], val_fraction: float) -> Iterator[tuple[str, str, bool]]:
    split = "train"
    index = 0  # of the next document
    starts = True
    for text, ends in pieces:
        if starts:
            split = "val" if is_validation(index, val_fraction) else "train"
            index += 1
        yield text, split, ends
        starts = ends


def _by_tail(pieces: Iterable[tuple[str, bool]], tail_start: int) -> Iterator[tuple[str, str, bool]]:
    """Training pieces up to character `tail_start`, validation ones after it. The piece holding it
    is cut at the first line start from there on (else the last one before it, else right there)
    into two documents, the end of a training one and the start of a validation one."""
    position = 0  # characters before this piece
    held = False
    starts = True
    for text, ends in _with_text(pieces):
        if not held and position + len(text) > tail_start:
            held = True
            cut = _line_start(text, tail_start - position)
            if text[:cut].strip() or not starts:  # else the piece starts a document: all of it is held out
                yield text[:cut], "train", True
                text = text[cut:]
        else:
            position += len(text)
        yield text, "val" if held else "train", ends
        starts = ends


def _line_start(text: str, offset: int) -> int:
    after = text.find("\n", offset)
    if after != -1 and text[after + 1:].strip():
        return after + 1
    before = text.rfind("\n", 0, offset)
    return before + 1 if before != -1 else offset


def is_validation(index: int, val_fraction: float) -> bool:
    """Whether document `index` is in the validation split.

    The validation documents are evenly spaced: after any n documents exactly round(n * val_fraction)
    of them are validation ones. That is deterministic, exact for small corpora (66 books give 7),
    needs no count up front (the store streams), and puts a validation document in any corpus of at
    least 1 / (2 * val_fraction) documents.
    """
    return math.floor((index + 1) * val_fraction + 0.5) > math.floor(index * val_fraction + 0.5)
